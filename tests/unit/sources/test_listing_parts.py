"""Listing as independent parts (``sources.listing.listing_parts`` / ``read_part``).

A prefix fans out over its sub-folders (breadth first, up to ``FAN_OUT`` parts and
``FAN_OUT_DEPTH`` levels) so a lake is listed by many tasks at once; whatever the
cut, the parts together list exactly what one recursive find lists, each object once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import sam3ray.sources.listing as listing
from sam3ray.config import InputConfig
from sam3ray.sources.listing import list_inputs, listing_parts, read_part

EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def lake_keys(n_folders: int = 12) -> list[str]:
    """Files at the root, in folders, sub-folders and one deep chain; some not images."""
    keys = ["top.jpg", "README.txt"]
    for i in range(n_folders):
        keys += [f"f{i:02d}/a.jpg", f"f{i:02d}/sub/b.png"]
        if i % 3 == 0:
            keys += [f"f{i:02d}/sub/notes.txt", f"f{i:02d}/sub/deeper/c.JPG"]
    keys += ["x/y/z/w/v/deep.webp"]
    return keys


def images(keys: list[str]) -> list[str]:
    return [k for k in keys if k.lower().endswith(EXTS)]


@pytest.fixture(params=["local", "s3"])
def lake(request, tmp_path) -> tuple[str, dict, list[str]]:
    """(root URI, storage options, keys) of a small lake on each backend."""
    keys = lake_keys()
    if request.param == "local":
        for key in keys:
            path = tmp_path / "lake" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        return str(tmp_path / "lake"), {}, keys
    s3 = request.getfixturevalue("moto_s3")
    bucket = s3.new_bucket("fanout")
    client = s3.boto3_client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"lake/{key}", Body=b"x")
    return f"s3://{bucket}/lake", dict(s3.storage_options), keys


def listed(config: InputConfig) -> tuple[list, list[str]]:
    parts = listing_parts(config)
    return parts, [u for p in parts for u in read_part(config, p)]


def find_all(config: InputConfig, root: str) -> list[str]:
    """What one recursive find lists below ``root`` (images only)."""
    loc = config.location(root)
    loc.refresh()
    return sorted(loc.sibling_uri(p) for p in loc.fs.find(loc.path) if p.lower().endswith(EXTS))


def depth(part, root: str) -> int:
    return len([p for p in part.uri.rstrip("/").removeprefix(root).split("/") if p])


@pytest.mark.parametrize("fan_out", [64, 6])
def test_the_parts_list_exactly_what_one_find_lists(lake, monkeypatch, fan_out):
    root, opts, keys = lake
    monkeypatch.setattr(listing, "FAN_OUT", fan_out)
    config = InputConfig(uris=[root + "/"], storage_options=opts)
    parts, uris = listed(config)
    assert len(uris) == len(set(uris)), "no object in two parts"
    assert sorted(uris) == find_all(config, root) == sorted(f"{root}/{k}" for k in images(keys))
    assert [r.uri for r in list_inputs(config)] == sorted(uris)
    finds = [p for p in parts if p.kind == "find"]
    assert {p.kind for p in parts} == {"files", "find"}
    if fan_out == 64:  # room to descend: the driver lists down to FAN_OUT_DEPTH levels
        assert {depth(p, root) for p in finds} == {listing.FAN_OUT_DEPTH}
        assert len(parts) > 13, "every folder of the first levels is a part of its own"
    else:  # the first level already has more sub-folders than FAN_OUT: one part each
        assert sorted(p.uri.rstrip("/") for p in finds) == sorted(
            {f"{root}/{k.split('/')[0]}" for k in keys if "/" in k}
        )
        assert len(parts) == len(finds) + 1  # + the files at the root


def test_a_glob_fans_out_below_its_literal_prefix(lake):
    root, opts, keys = lake
    config = InputConfig(uris=[root + "/f0*/**/*.png"], storage_options=opts)
    parts, uris = listed(config)
    want = sorted(f"{root}/{k}" for k in keys if k.startswith("f0") and k.endswith(".png"))
    assert sorted(uris) == want and len(uris) == len(set(uris))
    assert len(parts) > 1 and all(p.pattern for p in parts)


def test_a_wide_prefix_is_listed_one_level_deep_by_the_driver(tmp_path, monkeypatch):
    """More sub-folders than FAN_OUT: the driver lists that one level (one part per
    sub-folder) and descends no further; the parts list below it."""
    monkeypatch.setattr(listing, "FAN_OUT", 16)
    for i in range(40):
        (tmp_path / f"d{i:03d}" / "e").mkdir(parents=True)
        (tmp_path / f"d{i:03d}" / "e" / "a.jpg").write_bytes(b"x")
    config = InputConfig(uris=[str(tmp_path)])
    parts, uris = listed(config)
    assert len(uris) == len(set(uris)) == 40
    assert sorted(p.uri for p in parts) == sorted(str(tmp_path / f"d{i:03d}") for i in range(40))
    assert {p.kind for p in parts} == {"find"}


def test_a_single_file_is_one_part_taken_as_is(tmp_path):
    path = Path(tmp_path / "notes.TXT")
    path.write_text("x")
    config = InputConfig(uris=[str(path)])
    (part,) = listing_parts(config)
    assert part.kind == "files" and part.explicit
    assert list(read_part(config, part)) == [str(path)]
