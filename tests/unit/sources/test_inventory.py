"""S3 Inventory reports as an input (``sources.inventory`` through ``sources.listing``).

Reports are written here in the format S3 writes them (``manifest.json`` naming
gzipped CSV data files without a header, keys URL-encoded; or Parquet / ORC data
files with snake_case columns and plain keys), under the destination layout
``<prefix>/<source bucket>/<config id>/<YYYY-MM-DDTHH-MMZ>/manifest.json``, and
served by the moto S3 server (``tests/conftest.py``).
"""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sam3ray.config import InputConfig
from sam3ray.core.errors import InputError
from sam3ray.sources.listing import list_inputs, listing_parts, read_part

#: (key as stored, live?): what the source bucket's inventory lists.
OBJECTS = [
    ("photos/a.jpg", True),
    ("photos/my cat.jpg", True),  # CSV: "photos/my+cat.jpg"
    ("photos/c+d.png", True),  # CSV: "photos/c%2Bd.png"
    ("photos/caf\u00e9.JPEG", True),  # CSV: "photos/caf%C3%A9.JPEG"
    ("photos/deep/e.webp", True),
    ("photos/notes.txt", True),  # not an image
    ("photos/old.jpg", False),  # a delete marker is its latest version
]
#: Rows of a versioned report: (key, version is latest, is a delete marker).
ROWS = [
    *((k, True, False) for k, live in OBJECTS if live),
    ("photos/a.jpg", False, False),  # an older version of a live object
    ("photos/old.jpg", False, False),  # the deleted object's last real version
    ("photos/old.jpg", True, True),  # its delete marker
]
LIVE_IMAGES = sorted(k for k, live in OBJECTS if live and not k.endswith(".txt"))
CSV_SCHEMA = "Bucket, Key, Size, IsLatest, IsDeleteMarker"
PARQUET_SCHEMA = (
    "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); "
    "optional int64 size; optional boolean is_latest; optional boolean is_delete_marker;}"
)


def form_encoded(key: str) -> str:
    """A key as S3 writes it in CSV reports (URL form encoding: ``+`` for a space)."""
    from urllib.parse import quote_plus

    return quote_plus(key, safe="/")


def csv_gz(bucket: str, rows) -> bytes:
    lines = [
        f'"{bucket}","{form_encoded(k)}","{"" if dm else 123}","{str(latest).lower()}",'
        f'"{str(dm).lower()}"'
        for k, latest, dm in rows
    ]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def parquet(bucket: str, rows) -> bytes:
    table = pa.table(
        {
            "bucket": [bucket] * len(rows),
            "key": [k for k, _, _ in rows],
            "size": [None if dm else 123 for _, _, dm in rows],
            "is_latest": [latest for _, latest, _ in rows],
            "is_delete_marker": [dm for _, _, dm in rows],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def orc(bucket: str, rows) -> bytes:
    import pyarrow.orc as po

    table = pq.read_table(io.BytesIO(parquet(bucket, rows)))
    sink = io.BytesIO()
    po.write_table(table, sink)
    return sink.getvalue()


def write_report(moto_s3, dest: str, source: str, date: str, fmt: str, rows, parts=2) -> str:
    """One report of ``rows`` in ``parts`` data files; returns its manifest's URI."""
    config = f"inventory/{source}/nightly"
    make, schema, ext = {
        "CSV": (csv_gz, CSV_SCHEMA, "csv.gz"),
        "Parquet": (parquet, PARQUET_SCHEMA, "parquet"),
        "ORC": (orc, PARQUET_SCHEMA.replace("message s3.inventory", "struct"), "orc"),
    }[fmt]
    files = []
    for i in range(parts):
        key = f"{config}/data/{date}-{i:04d}.{ext}"
        body = make(source, rows[i::parts])
        moto_s3.put(dest, key, body)
        files.append({"key": key, "size": len(body), "MD5checksum": "0" * 32})
    manifest = {
        "sourceBucket": source,
        "destinationBucket": f"arn:aws:s3:::{dest}",
        "version": "2016-11-30",
        "creationTimestamp": "1767229200000",
        "fileFormat": fmt,
        "fileSchema": schema,
        "files": files,
    }
    uri = moto_s3.put(dest, f"{config}/{date}/manifest.json", json.dumps(manifest))
    moto_s3.put(dest, f"{config}/{date}/manifest.checksum", "0" * 32)
    return uri


@pytest.fixture()
def buckets(moto_s3):
    """A source bucket holding the live objects and an inventory destination bucket."""
    source, dest = moto_s3.new_bucket("lake"), moto_s3.new_bucket("inventory")
    for key, live in OBJECTS:
        if live:
            moto_s3.put(source, key, b"x")
    return source, dest


def cfg(moto_s3, inventory: str, **kw) -> InputConfig:
    return InputConfig(inventory=inventory, storage_options=moto_s3.storage_options, **kw)


@pytest.mark.parametrize("fmt", ["CSV", "Parquet", "ORC"])
def test_a_report_lists_exactly_the_live_images(moto_s3, buckets, fmt):
    if fmt == "ORC":
        pytest.importorskip("pyarrow.orc")
    source, dest = buckets
    manifest = write_report(moto_s3, dest, source, "2026-01-02T01-00Z", fmt, ROWS, parts=3)
    config = cfg(moto_s3, manifest)
    parts = listing_parts(config)
    assert [p.kind for p in parts] == ["inventory"] * 3, "one part per data file"
    assert all(p.uri.startswith(f"s3://{dest}/inventory/{source}/nightly/data/") for p in parts)
    per_part = [sorted(read_part(config, p)) for p in parts]
    flat = [u for uris in per_part for u in uris]
    assert sorted(flat) == [f"s3://{source}/{k}" for k in LIVE_IMAGES], "each live image once"
    assert [r.uri for r in list_inputs(config)] == [f"s3://{source}/{k}" for k in LIVE_IMAGES]
    # What the report lists really is there (the keys were decoded right).
    fs = config.location(f"s3://{source}/").fs
    assert all(fs.exists(u) for u in flat)


def test_the_config_folder_means_its_latest_dated_report(moto_s3, buckets):
    source, dest = buckets
    older = [("photos/gone-since.jpg", True, False), ("photos/a.jpg", True, False)]
    write_report(moto_s3, dest, source, "2026-01-01T01-00Z", "CSV", older, parts=1)
    write_report(moto_s3, dest, source, "2026-01-02T01-00Z", "Parquet", ROWS, parts=1)
    moto_s3.put(dest, f"inventory/{source}/nightly/hive/dt=2026-01-02-01-00/symlink.txt", "x")
    folder = f"s3://{dest}/inventory/{source}/nightly/"
    got = [r.uri for r in list_inputs(cfg(moto_s3, folder))]
    assert got == [f"s3://{source}/{k}" for k in LIVE_IMAGES]
    # A new report tonight is what the next run lists (no stale listing).
    tonight = [*ROWS, ("photos/new.jpg", True, False)]
    write_report(moto_s3, dest, source, "2026-01-03T01-00Z", "CSV", tonight, parts=2)
    again = [r.uri for r in list_inputs(cfg(moto_s3, folder))]
    assert again == sorted([*got, f"s3://{source}/photos/new.jpg"])


def test_extensions_filter_inventory_entries(moto_s3, buckets):
    source, dest = buckets
    manifest = write_report(moto_s3, dest, source, "2026-01-02T01-00Z", "CSV", ROWS)
    got = [r.uri for r in list_inputs(cfg(moto_s3, manifest, extensions=[".png", ".txt"]))]
    assert got == [f"s3://{source}/photos/c+d.png", f"s3://{source}/photos/notes.txt"]


def test_bad_reports_are_refused_naming_the_manifest(moto_s3, buckets):
    source, dest = buckets
    base = f"s3://{dest}/inventory/{source}/nightly"
    with pytest.raises(InputError, match="no dated inventory report"):
        listing_parts(cfg(moto_s3, f"{base}/"))
    manifest = write_report(moto_s3, dest, source, "2026-01-02T01-00Z", "CSV", ROWS)
    with pytest.raises(InputError, match="not found"):
        listing_parts(cfg(moto_s3, manifest.replace("01-00Z", "02-00Z")))
    data = json.loads(cfg(moto_s3, manifest).location(manifest).read_bytes())
    for broken, why in (
        ({**data, "fileFormat": "Avro"}, "fileFormat"),
        ({**data, "fileSchema": "Size, IsLatest"}, "Bucket, Key"),
        ({**data, "files": []}, "no destinationBucket or files"),
    ):
        bad = moto_s3.put(dest, "bad/manifest.json", json.dumps(broken))
        with pytest.raises(InputError, match=why) as info:
            listing_parts(cfg(moto_s3, bad))
        assert "bad/manifest.json" in str(info.value)
    not_json = moto_s3.put(dest, "bad2/manifest.json", "{oops")
    with pytest.raises(InputError, match="not JSON"):
        listing_parts(cfg(moto_s3, not_json))
