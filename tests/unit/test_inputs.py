"""Input listing (local and S3 via a real moto server), manifests, and retrying reads."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from sam3ray.config import InputConfig
from sam3ray.inputs import (
    InputError,
    InputRef,
    filesystem_for,
    image_id_for,
    is_object_store,
    is_transient,
    list_inputs,
    read_bytes,
)
from sam3ray.types import stable_id


def tree(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


NAMES = ["b.jpg", "a/c.PNG", "a/deep/d.webp", "a/notes.txt", "z.json", "a/e.jpeg"]


def uris(refs: list[InputRef]) -> list[str]:
    return [r.uri for r in refs]


def test_ids_and_schemes():
    assert image_id_for("s3://b/x.jpg") == stable_id("s3://b/x.jpg")
    assert len(image_id_for("/x.jpg")) == 16
    assert is_object_store("s3://b/k") and is_object_store("gs://b/k")
    assert is_object_store("https://host/x.jpg")
    assert not is_object_store("/data/x.jpg") and not is_object_store("file:///data/x.jpg")
    assert not is_object_store("relative/x.jpg")


def test_local_directory_glob_and_file(tmp_path):
    tree(tmp_path, NAMES)
    expected = sorted(str(tmp_path / n) for n in NAMES if not n.endswith((".txt", ".json")))
    refs = list_inputs(InputConfig(uris=[str(tmp_path)]))
    assert uris(refs) == expected  # recursive, extension filter case-insensitive, sorted
    assert refs[0].image_id == image_id_for(refs[0].uri)
    # Overlapping uris are de-duplicated; a plain file is taken even with another suffix.
    cfg = InputConfig(
        uris=[str(tmp_path / "**" / "*.jpg"), str(tmp_path / "b.jpg"), str(tmp_path / "z.json")]
    )
    assert uris(list_inputs(cfg)) == [str(tmp_path / "b.jpg"), str(tmp_path / "z.json")]
    assert uris(list_inputs(InputConfig(uris=[f"file://{tmp_path}/a/*"]))) == [
        str(tmp_path / "a/c.PNG"),
        str(tmp_path / "a/e.jpeg"),
    ]
    only_webp = InputConfig(uris=[str(tmp_path)], extensions=["WEBP"])
    assert uris(list_inputs(only_webp)) == [str(tmp_path / "a/deep/d.webp")]


def test_listing_errors(tmp_path):
    tree(tmp_path, ["notes.txt"])
    with pytest.raises(InputError, match=r"input.uris\[1\]: not found: .*nope.jpg"):
        list_inputs(InputConfig(uris=[str(tmp_path), str(tmp_path / "nope.jpg")]))
    with pytest.raises(InputError, match="input.uris matched no files"):
        list_inputs(InputConfig(uris=[str(tmp_path), str(tmp_path / "*.jpg")]))


def test_manifest_formats(tmp_path):
    tree(tmp_path, ["imgs/a.jpg", "imgs/b.jpg"])
    a, b = str(tmp_path / "imgs/a.jpg"), str(tmp_path / "imgs/b.jpg")
    (tmp_path / "list.txt").write_text(f"# comment\n\nimgs/b.jpg\n{a}\n  file://{a}  \n")
    refs = list_inputs(InputConfig(manifest=str(tmp_path / "list.txt")))
    assert uris(refs) == [a, b]  # relative to the manifest, de-duplicated, sorted
    (tmp_path / "m.csv").write_text(f"id,uri\n1,{b}\n2,s3://bucket/x.jpg\n")
    assert uris(list_inputs(InputConfig(manifest=str(tmp_path / "m.csv")))) == [
        b,
        "s3://bucket/x.jpg",
    ]
    pq.write_table(pa.table({"uri": [a, "gs://g/y.png"]}), tmp_path / "m.parquet")
    assert uris(list_inputs(InputConfig(manifest=str(tmp_path / "m.parquet")))) == [
        a,
        "gs://g/y.png",
    ]
    (tmp_path / "bad.csv").write_text(f"uri\n{a}\n\n   \n")
    with pytest.raises(InputError, match=r"bad\.csv row 4: uri is empty"):
        list_inputs(InputConfig(manifest=str(tmp_path / "bad.csv")))
    (tmp_path / "nouri.csv").write_text("path\nx.jpg\n")
    with pytest.raises(InputError, match="no 'uri' column"):
        list_inputs(InputConfig(manifest=str(tmp_path / "nouri.csv")))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="input.manifest: .*empty.txt lists no URIs"):
        list_inputs(InputConfig(manifest=str(tmp_path / "empty.txt")))
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "nouri.parquet")
    with pytest.raises(InputError, match="no 'uri' column"):
        list_inputs(InputConfig(manifest=str(tmp_path / "nouri.parquet")))


@pytest.fixture
def s3_tree(moto_s3):
    bucket = moto_s3.new_bucket("inputs")
    for key in ["imgs/b.jpg", "imgs/a/c.png", "imgs/a/deep/d.JPG", "imgs/a/x.txt", "other/e.jpg"]:
        moto_s3.put(bucket, key, key)
    return bucket


def test_s3_glob_prefix_and_dedupe(moto_s3, s3_tree):
    opts = moto_s3.storage_options
    b = s3_tree
    imgs = [f"s3://{b}/imgs/a/c.png", f"s3://{b}/imgs/a/deep/d.JPG", f"s3://{b}/imgs/b.jpg"]
    assert uris(list_inputs(InputConfig(uris=[f"s3://{b}/imgs/"], storage_options=opts))) == imgs
    deep = InputConfig(uris=[f"s3://{b}/imgs/**/*.jpg"], storage_options=opts)
    assert uris(list_inputs(deep)) == [imgs[2]]  # "**/" matches zero folders; glob is exact case
    glob = InputConfig(uris=[f"s3://{b}/imgs/**/*.jpg", f"s3://{b}/**"], storage_options=opts)
    assert uris(list_inputs(glob)) == imgs[:1] + [imgs[1], imgs[2], f"s3://{b}/other/e.jpg"]
    one = InputConfig(uris=[f"s3://{b}/imgs/b.jpg", f"s3://{b}/imgs/*.jpg"], storage_options=opts)
    assert list_inputs(one) == [InputRef(imgs[2], image_id_for(imgs[2]))]
    # Objects added later are seen by the next listing (no stale listing cache).
    moto_s3.put(b, "imgs/new.jpg", "n")
    assert f"s3://{b}/imgs/new.jpg" in uris(
        list_inputs(InputConfig(uris=[f"s3://{b}/imgs/"], storage_options=opts))
    )
    with pytest.raises(InputError, match="not found"):
        list_inputs(InputConfig(uris=[f"s3://{b}/missing"], storage_options=opts))


def test_s3_manifest_cannot_reach_local_files(moto_s3, s3_tree, tmp_path):
    opts = moto_s3.storage_options
    b = s3_tree
    ok = moto_s3.put(b, "m/ok.txt", f"s3://{b}/imgs/b.jpg\nimgs/a/c.png\n")
    with pytest.raises(
        InputError, match=r"ok.txt line 2: imgs/a/c.png: local paths are not allowed"
    ):
        list_inputs(InputConfig(manifest=ok, storage_options=opts))
    evil = moto_s3.put(b, "m/evil.csv", f"uri\ns3://{b}/imgs/b.jpg\nfile:///etc/passwd\n")
    with pytest.raises(InputError, match="file:///etc/passwd: local paths are not allowed"):
        list_inputs(InputConfig(manifest=evil, storage_options=opts))
    remote = moto_s3.put(b, "m/remote.txt", f"s3://{b}/imgs/b.jpg\ns3://{b}/other/e.jpg\n")
    refs = list_inputs(InputConfig(manifest=remote, storage_options=opts))
    assert uris(refs) == [f"s3://{b}/imgs/b.jpg", f"s3://{b}/other/e.jpg"]
    # Explicitly allowed: local entries resolve (relative to cwd for a remote manifest).
    tree(tmp_path, ["l.jpg"])
    mixed = moto_s3.put(b, "m/mixed.txt", f"{tmp_path / 'l.jpg'}\n")
    cfg = InputConfig(manifest=mixed, storage_options=opts, allow_local=True)
    assert uris(list_inputs(cfg)) == [str(tmp_path / "l.jpg")]
    # allow_local=False also refuses local uris given directly.
    with pytest.raises(InputError, match=r"input.uris\[0\]: .* local paths are not allowed"):
        list_inputs(InputConfig(uris=[str(tmp_path)], allow_local=False))


def test_read_bytes_local_and_s3(moto_s3, s3_tree, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    assert read_bytes(str(tmp_path / "x.bin")) == b"\x00\x01"
    assert read_bytes(f"s3://{s3_tree}/imgs/b.jpg", moto_s3.storage_options) == b"imgs/b.jpg"
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{s3_tree}/imgs/none.jpg", moto_s3.storage_options, base_delay=5.0)


def test_filesystem_cache():
    fs1, path = filesystem_for("s3://b/k.jpg", {"anon": True})
    fs2, _ = filesystem_for("s3://b/other.jpg", {"anon": True})
    fs3, _ = filesystem_for("s3://b/k.jpg", {"anon": False})
    assert fs1 is fs2 and fs1 is not fs3 and path == "b/k.jpg"
    local, p = filesystem_for("file:///tmp/../tmp/x.jpg", {"key": "ignored"})
    assert p == "/tmp/x.jpg" and local is filesystem_for("/y", None)[0]


def client_error(code: str, status: int) -> ClientError:
    body = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(body, "GetObject")


def test_is_transient():
    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("Whatever", 502))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(client_error("AccessDenied", 403))
    wrapped = OSError(errno.EIO, "slow")
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert is_transient(wrapped)
    denied = OSError(errno.EIO, "x")
    denied.__cause__ = client_error("InvalidAccessKeyId", 403)
    assert not is_transient(denied)
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not is_transient(FileNotFoundError("x")) and not is_transient(PermissionError())
    assert not is_transient(ValueError("bad"))


def test_read_bytes_retries_only_transient_errors(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"data")
    fs, _ = filesystem_for(str(path), None)
    calls: list[str] = []

    def flaky(p, *a, **k):
        calls.append(p)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "503 Slow Down")
        return b"data"

    monkeypatch.setattr(fs, "cat_file", flaky)
    assert read_bytes(str(path), base_delay=0.0) == b"data" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError):
        read_bytes(str(path), retries=1, base_delay=0.0)
    assert len(calls) == 2  # one try + one retry

    def denied(p, *a, **k):
        calls.append(p)
        raise PermissionError("AccessDenied")

    calls.clear()
    monkeypatch.setattr(fs, "cat_file", denied)
    with pytest.raises(PermissionError):
        read_bytes(str(path), base_delay=0.0)
    assert len(calls) == 1


def test_gcs_uris_get_a_gcsfs_filesystem():
    """gs:// is a first-class store (gcsfs is a dependency); nothing is contacted here."""
    fs, path = filesystem_for("gs://bucket/imgs/a.jpg", {"token": "anon"})
    assert "gs" in fs.protocol or "gcs" in fs.protocol
    assert path == "bucket/imgs/a.jpg"
