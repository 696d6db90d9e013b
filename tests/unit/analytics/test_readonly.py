"""stats, export and preview on a read-only lake: they read, and write only where asked.

The output's bucket sits behind a proxy that refuses every write to it with 403
AccessDenied (``tests/support/readonly_s3.py``: what read-only credentials look
like to s3fs); exports go to another bucket and to local disk.
"""

from __future__ import annotations

import json
from collections import Counter

from test_scan import build_output

from sam3ray.cli import main
from tests.support.readonly_s3 import ReadOnlyS3Proxy


def _keys(moto_s3, bucket: str) -> dict[str, str]:
    pages = moto_s3.boto3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_tools_on_a_read_only_output(moto_s3, tmp_path, capsys):
    lake, exports = moto_s3.new_bucket("lake"), moto_s3.new_bucket("exports")
    syn = build_output(f"s3://{lake}/out", moto_s3.storage_options, f"s3://{lake}/images")
    before = _keys(moto_s3, lake)
    with ReadOnlyS3Proxy(moto_s3.endpoint_url, bucket=lake) as proxy:
        flags = ["--storage-option=key=testing", "--storage-option=secret=testing",
                 f"--storage-option=client_kwargs.endpoint_url={proxy.endpoint_url}",
                 "--storage-option=client_kwargs.region_name=us-east-1"]  # fmt: skip
        out = syn.output
        assert main(["stats", out, *flags]) == 0
        assert "circle" in capsys.readouterr().out
        assert main(["export", "coco", out, "--out", f"s3://{exports}/coco.json", *flags]) == 0
        ls = ["--out", f"s3://{exports}/ls.json", "--format", "polygon"]
        assert main(["export", "labelstudio", out, *ls, *flags]) == 0
        site = tmp_path / "preview"
        assert main(["preview", out, "--out", str(site), *flags]) == 0
        assert "preview: " in capsys.readouterr().out and (site / "index.html").is_file()
        assert proxy.refused == Counter()  # not one write was even tried on the lake
        assert proxy.forwarded["GET"] > 0  # it read through the read-only door
        assert _keys(moto_s3, lake) == before
        tasks = json.loads(moto_s3.boto3_client().get_object(Bucket=exports,
                           Key="ls.json")["Body"].read())  # fmt: skip
        assert len(tasks) == len(syn.ok_images)

        # Writing into the lake only when asked, and then the store's refusal is said
        assert main(["stats", out, "--save", *flags]) == 2
        err = capsys.readouterr().err
        assert "not allowed to write" in err and "stats/concepts.parquet" in err
        assert sum(proxy.refused.values()) > 0
        coco_in_lake = ["--out", f"{out}/exports/coco.json"]
        assert main(["export", "coco", out, *coco_in_lake, *flags]) == 2
        assert _keys(moto_s3, lake) == before
