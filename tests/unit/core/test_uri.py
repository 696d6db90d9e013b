"""core.uri: the one URI parser (pure string work: nothing here touches a filesystem)."""

from __future__ import annotations

import os

import pytest

from sam3ray.core.uri import (
    canonical_input,
    covers,
    has_glob,
    has_scheme,
    hide_userinfo,
    is_object_store,
    literal_prefix,
    local_path,
    normalize,
    rejoin,
    scheme,
    store_family,
)


def test_scheme():
    assert scheme("s3://b/k") == "s3" and scheme("S3A://b/k") == "s3a"
    assert scheme("gs://b") == "gs" and scheme("file:///x") == "file"
    assert scheme("simplecache::s3://b") is None  # a chained URL is not a plain scheme
    assert scheme("git+ssh://h/x") == "git+ssh"
    for plain in ("/data/x.jpg", "rel/x.jpg", "C:/x", "file:/x", "", "3s://b"):
        assert scheme(plain) is None, plain
        assert not has_scheme(plain)
    assert has_scheme("https://host/x.jpg")


def test_object_store_and_family():
    assert is_object_store("s3://b/k") and is_object_store("gs://b/k")
    assert is_object_store("https://host/x.jpg") and is_object_store("memory:///x")
    assert not is_object_store("/data/x.jpg") and not is_object_store("file:///data/x.jpg")
    assert not is_object_store("LOCAL:///x") and not is_object_store("relative/x.jpg")
    assert store_family("s3a://b") == store_family("S3N://b") == store_family("s3://b") == "s3"
    assert store_family("gcs://b") == "gs" and store_family("/x") == "file"
    assert store_family("az://c") == "az"


def test_globs_and_literal_prefix():
    assert has_glob("s3://b/imgs/*.jpg") and has_glob("/x/?.png") and has_glob("/x/[ab].png")
    assert has_glob("s3://b/**")
    assert not has_glob("s3://b/imgs/") and not has_glob("/x/a.png")
    assert literal_prefix("s3://b/imgs/**/*.jpg") == "s3://b/imgs/"
    assert literal_prefix("s3://b/img*") == "s3://b/img"
    assert literal_prefix("/x/[ab].png") == "/x/"
    assert literal_prefix("s3://b/imgs/a.jpg") == "s3://b/imgs/a.jpg"
    assert literal_prefix("*.jpg") == ""


def test_local_path_and_rejoin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_path("file:///data/../data/x.jpg") == "/data/x.jpg"
    assert local_path("rel/x.jpg") == str(tmp_path / "rel" / "x.jpg")
    assert local_path("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert rejoin("s3://b/imgs/*.jpg", "b/imgs/a.jpg") == "s3://b/imgs/a.jpg"
    assert rejoin("s3a://b/imgs/", "/b/imgs/a.jpg") == "s3a://b/imgs/a.jpg"  # as written
    assert rejoin("/data/*.jpg", "/data/a.jpg") == "/data/a.jpg"
    assert rejoin("file:///data/", "/data/a.jpg") == "/data/a.jpg"


def test_normalize(tmp_path, monkeypatch):
    assert normalize("s3a://b//imgs///x/") == "s3://b/imgs/x"
    assert normalize("S3N://b/imgs") == "s3://b/imgs"
    assert normalize("gcs://b/x") == normalize("gs://b/x") == "gs://b/x"
    assert normalize("file:///tmp/../tmp/") == os.path.realpath("/tmp")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert normalize(str(tmp_path / "link") + "/") == os.path.realpath(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert normalize("real") == os.path.realpath(tmp_path / "real")
    assert normalize("/") == "/"


@pytest.mark.parametrize(
    "prefix,target,inside",
    [
        ("s3://b/images/", "s3://b/images/labels", True),
        ("s3://b/images", "s3://b/images", True),
        ("s3://b/images", "s3a://b/images//labels/", True),  # alias and double slash
        ("s3a://b/images", "s3://b/images/x", True),
        ("s3://b/images", "s3://b/images-labels", False),  # a sibling sharing a prefix
        ("s3://b/images/", "s3://b/labels/", False),
        ("s3://b/images", "s3://c/images/x", False),  # another bucket
        ("s3://b/images", "gs://b/images/x", False),  # another store
        ("s3://b/images/**/*.jpg", "s3://b/images/2024/labels", True),
        ("s3://b/images/*.jpg", "s3://b/images/labels", True),  # the glob lists from images/
        ("s3://b/img*", "s3://b/img_labels", True),  # a glob prefix covers siblings
        ("s3://b/img*", "s3://b/img/labels", True),
        ("s3://b/img*", "s3://b/other", False),
        ("s3://b/images/?", "s3://b/images2", False),
        ("/data/imgs", "/data/imgs/out", True),
        ("/data/imgs", "/data/imgs/../imgs/labels", True),
        ("/data/imgs", "/data/imgs-out", False),
        ("file:///data/imgs/", "/data/imgs/out", True),
        ("/data/imgs/*.png", "/data/imgs/labels", True),
        ("/data/imgs", "s3://data/imgs/out", False),
    ],
)
def test_covers(prefix, target, inside):
    assert covers(prefix, target) is inside


def test_covers_follows_local_symlinks(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "imgs")
    assert covers(str(tmp_path / "imgs"), str(tmp_path / "alias" / "labels"))
    assert not covers(str(tmp_path / "imgs"), str(tmp_path / "imgs-labels"))


def test_canonical_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical_input("imgs/a.jpg") == str(tmp_path / "imgs" / "a.jpg")
    assert canonical_input("file:///data/a.jpg") == "/data/a.jpg"
    assert canonical_input("/data/./a.jpg") == "/data/a.jpg"
    for remote in ("s3://b/a.jpg", "s3a://b//a.jpg", "gs://b/a.jpg", "https://h/a.jpg"):
        assert canonical_input(remote) == remote  # as listings return them: unchanged


def test_hide_userinfo():
    assert hide_userinfo("http://user:pw@minio.local:9000/x") == "http://***@minio.local:9000/x"
    assert hide_userinfo("s3://AKIA:secret@bucket/out") == "s3://***@bucket/out"
    assert hide_userinfo("http://minio.local:9000/x") == "http://minio.local:9000/x"
    assert hide_userinfo("s3://bucket/a@b.jpg") == "s3://bucket/a@b.jpg"  # @ in a key, not userinfo
    assert hide_userinfo("/data/a@b.jpg") == "/data/a@b.jpg"


@pytest.mark.parametrize("uri", ["file:///data/x.jpg", "local:///data/x.jpg", "FILE:///data/x.jpg"])
def test_every_local_scheme_is_one_local_path(uri):
    """What ``is_object_store`` calls local must also be read, compared and matched as local."""
    assert not is_object_store(uri)
    assert local_path(uri) == "/data/x.jpg"
    assert normalize(uri) == os.path.realpath("/data/x.jpg")
    assert canonical_input(uri) == "/data/x.jpg"
    assert covers("/data", uri) and covers(uri, "/data/x.jpg/labels")
