"""Relabelling some concepts of a committed shard (``stages.commit`` + ``output.relabel``).

A shard is committed fresh, then a task from ``plan.shards.stale_task`` (a concept
added, dropped or edited) is committed over it, with fake labels (no model): the
other concepts' files stay byte for byte, the images rows are rewritten with
``n_detections`` over every concept, and an input that cannot be read any more
keeps its old row and its old labels.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from sam3ray.config import JobConfig
from sam3ray.core.ids import input_id, video_shard_id
from sam3ray.core.shards import Shard, ShardTask, VideoInfo, VideoSpan
from sam3ray.core.types import Concept, ConceptSet
from sam3ray.output.layout import detections_path, images_path, staging_path
from sam3ray.output.markers import read_marker
from sam3ray.output.parquet import read_table
from sam3ray.output.relabel import merge_staging
from sam3ray.output.schema import detections_table, images_table
from sam3ray.output.state import commit_key
from sam3ray.output.video import owned_rows, stitch_video
from sam3ray.plan.fingerprint import ConceptPrints
from sam3ray.plan.shards import fresh_task, image_shard_id, stale_task
from sam3ray.stages.commit import CommitStage
from sam3ray.stages.tasks import ShardResult, WorkerInfo
from sam3ray.storage.location import Location
from tests.support.lake import fake_result, n_found

CAT = "6f1c2a4e-1b7d-4c1e-9a55-0d7f1c3e2b01"
DOG = "7a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c02"
OWL = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e03"
NAMES = {CAT: "cat", DOG: "dog", OWL: "owl"}
CAT_DOG = (Concept(CAT, "cat", ("cat",)), Concept(DOG, "dog", ("dog",)))
URIS = tuple(f"s3://lake/{i:02d}.jpg" for i in range(6))
IDS = tuple(input_id(u) for u in URIS)
SHARD = Shard(image_shard_id(IDS), "image", URIS, IDS)
RUN1, RUN2 = "20260101T000001Z-one", "20260101T000002Z-two"


def prints(*concepts: Concept) -> ConceptPrints:
    cfg = JobConfig.model_validate(
        {
            "input": {"uris": ["s3://lake/"]},
            "prompts": {"concepts": "s3://lake/concepts.csv"},
            "model": {"checkpoint": "s3://models/sam3.pt"},
            "output": {"uri": "s3://labels/"},
        }
    )
    return ConceptPrints(cfg, ConceptSet(concepts))


@pytest.fixture()
def out(tmp_path) -> Location:
    return Location(str(tmp_path / "labels"))


def commit(out: Location, task: ShardTask, run_id: str, **kw) -> tuple[ShardResult, object]:
    result = fake_result(task, run_id, NAMES, **kw)
    return result, CommitStage(out, run_id).process(result)


def first_commit(out: Location, errors=()) -> dict[str, str]:
    """The shard labelled fresh with cat and dog by RUN1; returns its fingerprints."""
    task = fresh_task(SHARD, prints(*CAT_DOG))
    commit(out, task, RUN1, errors=errors)
    return dict(task.prints)


def files(out: Location) -> dict[str, bytes]:
    root = Path(out.path)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.glob("detections/*/*.parquet")}


def images(out: Location) -> dict[str, dict]:
    rows = read_table(out.child(images_path(SHARD.shard_id))).to_pylist()
    assert len(rows) == len(URIS), "each input once"
    return {r["image_id"]: r for r in rows}


def detections(out: Location, class_id: str) -> pa.Table:
    try:
        return read_table(out.child(detections_path(class_id, SHARD.shard_id)))
    except FileNotFoundError:
        return detections_table([])


def expected(class_ids, version=0, skip=()) -> Counter:
    return Counter(
        {i: sum(n_found(i, c, version) for c in class_ids) for i in IDS if i not in skip}
    )


def test_an_added_concept_is_written_beside_the_others(out):
    current = first_commit(out)
    before = files(out)
    assert len(before) == 2
    task = stale_task(SHARD, current, prints(*CAT_DOG, Concept(OWL, "owl", ("owl",))))
    assert task.concepts == (OWL,) and set(task.kept) == {CAT, DOG}
    result, summary = commit(out, task, RUN2)

    after = files(out)
    assert {k: v for k, v in after.items() if k in before} == before, "byte for byte"
    owl = detections(out, OWL)
    assert owl.num_rows == sum(expected([OWL]).values()) > 0
    assert set(owl.column("run_id").to_pylist()) == {RUN2}
    rows = images(out)
    want = expected([CAT, DOG, OWL])
    assert {i: r["n_detections"] for i, r in rows.items()} == dict(want)
    assert {r["run_id"] for r in rows.values()} == {RUN2}
    assert {r["status"] for r in rows.values()} == {"ok"}
    marker = read_marker(out, SHARD.shard_id)
    assert set(marker.files) == {*after, images_path(SHARD.shard_id)}
    assert marker.n_detections == sum(want.values()) and marker.prints == task.prints
    assert (summary.n_inputs, summary.n_detections) == (len(URIS), owl.num_rows)
    assert set(summary.detections_by_concept) == {"owl"}
    assert out.child(commit_key(RUN2, SHARD.shard_id)).exists()


def test_a_dropped_concept_loses_its_files_and_its_counts(out):
    current = first_commit(out)
    cat_file = detections_path(CAT, SHARD.shard_id)
    cat_bytes = files(out)[cat_file]
    task = stale_task(SHARD, current, prints(CAT_DOG[0]))
    assert task.concepts == () and task.drop == (DOG,)
    result, summary = commit(out, task, RUN2)
    assert result.images.num_rows == 0, "a drop-only task decodes nothing"

    assert files(out) == {cat_file: cat_bytes}
    assert {i: r["n_detections"] for i, r in images(out).items()} == dict(expected([CAT]))
    marker = read_marker(out, SHARD.shard_id)
    assert set(marker.files) == {cat_file, images_path(SHARD.shard_id)}
    assert dict(marker.prints) == {CAT: current[CAT]}
    assert summary.n_inputs == 0 and summary.n_detections == 0


def test_an_input_unreadable_now_keeps_its_row_and_its_labels(out):
    """CAT is edited; input 0 was deleted from the lake since: it keeps its old images row
    and its old CAT labels (carried over), the others get the new CAT labels."""
    current = first_commit(out)
    old_rows = images(out)
    old_cat = detections(out, CAT)
    dog_file = detections_path(DOG, SHARD.shard_id)
    dog_bytes = files(out)[dog_file]
    edited = Concept(CAT, "cat", ("cat", "kitten"))
    task = stale_task(SHARD, current, prints(edited, CAT_DOG[1]))
    assert task.concepts == (CAT,)
    gone = IDS[0]
    commit(out, task, RUN2, errors={URIS[0]}, version=1)

    rows = images(out)
    assert rows[gone]["status"] == "ok" and rows[gone]["error_reason"] is None
    keep = ("uri", "shard_id", "width", "height", "decode_ms", "infer_ms", "created_at")
    assert {k: rows[gone][k] for k in keep} == {k: old_rows[gone][k] for k in keep}
    assert rows[gone]["run_id"] == RUN2, "every row of a file carries the run that wrote it"
    cat = detections(out, CAT)
    by_input = Counter(cat.column("image_id").to_pylist())
    assert by_input == expected([CAT], version=0, skip=IDS[1:]) + expected(
        [CAT], version=1, skip=(gone,)
    )
    old_of_gone = old_cat.filter(pa.compute.equal(old_cat.column("image_id"), gone))
    new_of_gone = cat.filter(pa.compute.equal(cat.column("image_id"), gone))
    assert old_of_gone.num_rows > 0, "the input had cat labels: the check below is vacuous"
    assert new_of_gone.column("score").to_pylist() == old_of_gone.column("score").to_pylist()
    assert files(out)[dog_file] == dog_bytes
    want = expected([DOG]) + expected([CAT], 0, IDS[1:]) + expected([CAT], 1, (gone,))
    assert {i: r["n_detections"] for i, r in rows.items()} == {i: want[i] for i in IDS}


def test_an_input_in_error_stays_in_error_on_a_relabel(out):
    current = first_commit(out, errors={URIS[2]})
    task = stale_task(SHARD, current, prints(*CAT_DOG, Concept(OWL, "owl", ("owl",))))
    commit(out, task, RUN2)  # readable again now: a relabel does not redo it
    row = images(out)[IDS[2]]
    assert (row["status"], row["error_reason"], row["n_detections"]) == ("error", "not_found", 0)
    for cid in (CAT, DOG, OWL):
        assert IDS[2] not in detections(out, cid).column("image_id").to_pylist()


# -- video shards: staging merged, then stitched -------------------------------------------------

H, W = 48, 64
INFO = VideoInfo("/v.mp4", 8, 24.0, W, H, True, "h264")
VID = input_id("/v.mp4")
VSHARD = Shard(
    video_shard_id(VID, 0),
    "video",
    ("/v.mp4",),
    (VID,),
    VideoSpan(0, 1, tuple(range(8)), (0, 8), INFO),
)


def video_result(task: ShardTask, run_id: str, tracks: dict[str, int]) -> ShardResult:
    """What the track stage hands over: ``tracks`` = class id -> tracks (local ids from 0)."""
    rows = []
    for cid, n in tracks.items():
        for local in range(n):
            for f in range(8):
                rows.append({
                    "run_id": run_id, "image_id": VID, "uri": "/v.mp4", "frame_index": f,
                    "timestamp_s": f / 24, "track_id": local, "class_id": cid,
                    "concept": NAMES[cid], "query": "q", "score": 0.9, "box": [0, 0, 1, 1],
                    "mask_rle": f"{cid[:2]}{local}".encode(), "mask_size": [H, W], "area": 4,
                    "width": W, "height": H, "model": "m",
                })  # fmt: skip
    staging = detections_table(rows)
    det = owned_rows(staging, (0, 8), 0)
    img = images_table(
        [
            {"run_id": run_id, "image_id": VID, "uri": "/v.mp4", "shard_id": VSHARD.shard_id,
             "frame_start": 0, "frame_end": 8, "status": "ok", "n_detections": det.num_rows,
             "width": W, "height": H}
        ]
    )  # fmt: skip
    worker = WorkerInfo(os.getpid(), 0.0, 0.0, "m")
    return ShardResult(task, det, img, worker, 0.0, staging=staging)


def test_a_video_relabel_keeps_the_other_concepts_tracks_and_stitches(out):
    first = fresh_task(VSHARD, prints(*CAT_DOG))
    CommitStage(out, RUN1).process(video_result(first, RUN1, {CAT: 2, DOG: 1}))
    owl_set = prints(*CAT_DOG, Concept(OWL, "owl", ("owl",)))
    task = stale_task(VSHARD, dict(first.prints), owl_set)
    assert task.concepts == (OWL,)
    CommitStage(out, RUN2).process(video_result(task, RUN2, {OWL: 2}))

    staging = read_table(out.child(staging_path(VSHARD.shard_id)))
    tracks = {(r["class_id"], r["track_id"]) for r in staging.to_pylist()}
    assert tracks == {(CAT, 0), (CAT, 1), (DOG, 0), (OWL, 2), (OWL, 3)}, "new ids after old"
    assert set(staging.column("run_id").to_pylist()) == {RUN2}
    per_class = Counter(staging.column("class_id").to_pylist())
    assert per_class == {CAT: 16, DOG: 8, OWL: 16}
    marker = read_marker(out, VSHARD.shard_id)
    assert marker.n_detections == 40 and dict(marker.prints) == owl_set.for_shard(VSHARD)
    assert {detections_path(c, VSHARD.shard_id) for c in (CAT, DOG, OWL)} <= set(marker.files)
    assert stitch_video(out, [VSHARD], 0.5)["status"] == "stitched"
    assert read_marker(out, VSHARD.shard_id).n_detections == 40


def test_merge_staging_without_an_old_staging_is_the_new_one(out):
    new = video_result(fresh_task(VSHARD, prints(*CAT_DOG)), RUN1, {OWL: 1}).staging
    assert merge_staging(out, VSHARD.shard_id, new, (OWL,)).equals(new)
