"""Input listing (local and S3 via a real moto server) and manifests.

Reading bytes and filesystems: tests/unit/storage/test_location.py; retries:
tests/unit/storage/test_retry.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sam3ray.config import InputConfig
from sam3ray.core.errors import InputError
from sam3ray.core.ids import input_id, stable_id
from sam3ray.core.shards import InputRef
from sam3ray.core.uri import is_object_store
from sam3ray.sources.listing import list_inputs, read_manifest
from sam3ray.storage.location import Location


def tree(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


NAMES = ["b.jpg", "a/c.PNG", "a/deep/d.webp", "a/notes.txt", "z.json", "a/e.jpeg"]


def uris(refs: list[InputRef]) -> list[str]:
    return [r.uri for r in refs]


def test_ids_and_schemes():
    assert input_id("s3://b/x.jpg") == stable_id("s3://b/x.jpg")
    assert len(input_id("/x.jpg")) == 16
    assert InputRef.of("s3://b/x.jpg") == InputRef("s3://b/x.jpg", input_id("s3://b/x.jpg"))
    assert is_object_store("s3://b/k") and is_object_store("gs://b/k")
    assert is_object_store("https://host/x.jpg")
    assert not is_object_store("/data/x.jpg") and not is_object_store("file:///data/x.jpg")
    assert not is_object_store("relative/x.jpg")


def test_local_directory_glob_and_file(tmp_path):
    tree(tmp_path, NAMES)
    expected = sorted(str(tmp_path / n) for n in NAMES if not n.endswith((".txt", ".json")))
    refs = list_inputs(InputConfig(uris=[str(tmp_path)]))
    assert uris(refs) == expected  # recursive, extension filter case-insensitive, sorted
    assert refs[0].image_id == input_id(refs[0].uri)
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
    # The manifest itself, entry by entry in file order (no dedupe, no existence check).
    assert read_manifest(Location(str(tmp_path / "list.txt"))) == [b, a, f"file://{a}"]
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
    assert list_inputs(one) == [InputRef.of(imgs[2])]
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
    assert read_manifest(Location(remote, opts)) == [
        f"s3://{b}/imgs/b.jpg",
        f"s3://{b}/other/e.jpg",
    ]
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
