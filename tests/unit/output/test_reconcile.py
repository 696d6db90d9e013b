"""Orphaned shards: trimmed to the inputs no current shard owns, deleted when none is left."""

from __future__ import annotations

import os

import pyarrow as pa

from sam3ray.core.ids import members_hash, stable_id
from sam3ray.output.markers import scan_markers
from sam3ray.output.readers import detections_dataset, images_dataset
from sam3ray.output.reconcile import reconcile_orphans, trim_orphan
from sam3ray.output.schema import detections_table, images_table
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.storage.location import Location


def test_orphan_gives_up_inputs_a_current_shard_owns(out, rows):
    """Trim keeps the rows of inputs no current shard lists (and drops a class file left
    empty), keeps the marker's run and settings; an orphan fully claimed is deleted."""
    CAT, DOG, SHARD, RUN = rows.CAT, rows.DOG, rows.SHARD, rows.RUN
    writer = ShardWriter(out)
    uris = [f"s3://src/img/{i}.jpg" for i in range(3)]
    dets = [rows.det(uris[0], CAT, 0.9), rows.det(uris[0], CAT, 0.8), rows.det(uris[1], DOG, 0.7)]
    imgs = [rows.image(uris[0], n=2), rows.image(uris[1], n=1), rows.image(uris[2], "error")]
    marker = writer.write(
        ShardOutput(SHARD, "h", "fp1", RUN, detections_table(dets), images_table(imgs))
    )
    ids = [stable_id(u) for u in uris]

    assert trim_orphan(writer, marker, {"not-" + ids[0]}) == "kept"
    assert scan_markers(out)[SHARD] == marker

    assert trim_orphan(writer, marker, {ids[1]}) == "trimmed"
    trimmed = scan_markers(out)[SHARD]
    assert trimmed.members_hash == members_hash([ids[0], ids[2]])
    assert (trimmed.run_id, trimmed.settings_hash) == (RUN, "fp1")
    assert (trimmed.n_inputs, trimmed.n_ok, trimmed.n_error, trimmed.n_detections) == (2, 1, 1, 2)
    assert trimmed.files == (
        f"detections/class_id={CAT}/part-{SHARD}.parquet",
        f"images/part-{SHARD}.parquet",
    )  # the DOG file held only the claimed input's rows
    got = detections_dataset(out).to_table()  # unclaimed ids[0] keeps its labels
    assert set(got.column("image_id").to_pylist()) == {ids[0]} and got.num_rows == 2
    assert sorted(images_dataset(out).to_table().column("image_id").to_pylist()) == sorted(
        [ids[0], ids[2]]
    )

    assert trim_orphan(writer, trimmed, {ids[0], ids[2]}) == "deleted"
    assert scan_markers(out) == {}
    assert images_dataset(out).count_rows() == detections_dataset(out).count_rows() == 0


def test_reconcile_counts_outcomes_and_finishes_a_half_deleted_orphan(tmp_path, rows):
    SHARD, RUN = rows.SHARD, rows.RUN
    loc = Location(str(tmp_path / "labels"))
    writer = ShardWriter(loc)
    other = "s" + stable_id("other")
    det_t, img_t = rows.tables()
    kept = writer.write(ShardOutput(SHARD, "h", "", RUN, det_t, img_t))
    img_o = img_t.set_column(3, "shard_id", pa.array([other] * 3))
    half = writer.write(ShardOutput(other, "h", "", RUN, det_t, img_o))
    os.remove(tmp_path / "labels" / "images" / f"part-{other}.parquet")  # died mid-delete
    outcomes = reconcile_orphans(loc, {SHARD: kept, other: half}, {"unrelated"})
    assert outcomes == {"kept": 1, "deleted": 1}
    assert set(scan_markers(loc)) == {SHARD}
    assert reconcile_orphans(loc, {}, {"unrelated"}) == {}
