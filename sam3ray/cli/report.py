"""The end-of-job report a person reads (the run summary, as text)."""

from __future__ import annotations

from typing import Any


def summary_text(summary: dict[str, Any]) -> str:
    """The human-readable end-of-job report the CLI prints."""
    t = summary["timing_s"]
    lines = [
        f"run {summary['run_id']}: {summary['status']}",
        f"  inputs {summary['inputs_total']} (processed {summary['inputs_processed']}, "
        f"already done {summary['inputs_skipped_done']}): "
        f"ok {summary['ok']}, errors {summary['errors']}",
    ]
    for reason, n in sorted(summary["errors_by_reason"].items()):
        lines.append(f"    error {reason}: {n}")
    relabelled = summary.get("shards", {}).get("relabelled", 0)
    if relabelled:
        lines.append(f"  relabelled {relabelled} shards made with other labelling settings")
    lines.append(f"  detections {summary['detections']}")
    for concept, n in sorted(summary["detections_by_concept"].items()):
        lines.append(f"    {concept}: {n}")
    ips = summary["throughput"]["images_per_s"]
    lines.append(
        f"  {ips if ips is not None else '-'} images/s; ray init {t['ray_init']} s, "
        f"first shard {t['first_shard']} s, total {t['total']} s"
    )
    out = summary["output"].rstrip("/")
    lines.append(f"  output: {out}/detections (Parquet, class_id=<uuid>/), {out}/images")
    lines.append(f"  summary: {summary.get('summary_uri')}")
    if summary.get("failure"):
        lines.append(f"  failure: {summary['failure']}")
    return "\n".join(lines)
