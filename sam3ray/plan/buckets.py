"""The planner's work on one hash bucket: new shards, stale shards, consolidation.

These functions read the bucket's state files and return rows; they are what a
Ray task runs on a cluster (``runner.planning``) and what :mod:`sam3ray.plan.local`
runs in-process for small jobs, so both engines plan and consolidate alike.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sam3ray.config.schema import InputConfig, VideoConfig
from sam3ray.core.errors import SettingsChanged
from sam3ray.core.shards import InputRef, ShardTask
from sam3ray.output.state import (
    INDEX_DIR,
    INDEX_SCHEMA,
    SHARDS_DIR,
    SHARDS_SCHEMA,
    TASK_SCHEMA,
    Held,
    committed,
    current_shards,
    index_rows,
    possible_files,
    shard_from_row,
    shard_row,
    task_row,
    write_bucket,
)
from sam3ray.plan.fingerprint import ConceptPrints
from sam3ray.plan.shards import fresh_task, stale_task, unique_sorted
from sam3ray.plan.video import cut_videos
from sam3ray.sources.video import collapse_frame_folders, is_video_uri
from sam3ray.storage.location import Location


@dataclass
class PlanStats:
    """What a plan amounts to (summed over buckets; small)."""

    listed: int = 0  # distinct inputs the job lists
    new_images: int = 0
    new_videos: int = 0
    fresh_shards: int = 0
    fresh_inputs: int = 0  # images plus video shards labelled for the first time
    relabel_shards: int = 0
    relabel_inputs: int = 0  # inputs of shards some concept of which is (re)labelled
    drop_shards: int = 0  # shards that only lose concepts
    #: cid -> kind (new | added | edited | retried | removed) -> inputs
    by_concept: dict[str, dict[str, int]] = field(default_factory=dict)
    changed_by: set[str] = field(default_factory=set)  # runs whose labels a task changes
    kinds: dict[str, int] = field(default_factory=dict)  # tasks per kind of shard

    @property
    def done(self) -> int:
        return self.listed - self.new_images - self.new_videos

    def count(self, cid: str, kind: str, n: int) -> None:
        per = self.by_concept.setdefault(cid, {})
        per[kind] = per.get(kind, 0) + n

    def merge(self, other: PlanStats) -> PlanStats:
        for name in ("listed", "new_images", "new_videos", "fresh_shards", "fresh_inputs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("relabel_shards", "relabel_inputs", "drop_shards"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for cid, kinds in other.by_concept.items():
            for kind, n in kinds.items():
                self.count(cid, kind, n)
        self.changed_by |= other.changed_by
        for kind, n in other.kinds.items():
            self.kinds[kind] = self.kinds.get(kind, 0) + n
        return self

    @property
    def tasks(self) -> int:
        return self.fresh_shards + self.relabel_shards + self.drop_shards

    @property
    def inputs_to_label(self) -> int:
        return self.fresh_inputs + self.relabel_inputs

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": {
                "listed": self.listed,
                "done": self.done,
                "new": self.new_images + self.new_videos,
                "new_images": self.new_images,
                "new_videos": self.new_videos,
                "to_label": self.fresh_inputs,
                "to_relabel": self.relabel_inputs,
            },
            "shards": {
                "new": self.fresh_shards,
                "relabel": self.relabel_shards,
                "drop_only": self.drop_shards,
            },
            "by_concept": self.by_concept,
        }


def count_fresh(stats: PlanStats, tasks: Sequence[ShardTask]) -> None:
    for t in tasks:
        stats.kinds[t.shard.kind] = stats.kinds.get(t.shard.kind, 0) + 1
        stats.fresh_shards += 1
        stats.fresh_inputs += len(t.shard)
        for cid in t.concepts:
            stats.count(cid, "new", len(t.shard))


def new_work(
    bucket: int,
    listed: Iterable[InputRef],
    source: InputConfig,
    video: VideoConfig,
    prints: ConceptPrints,
    held: Held,
) -> tuple[list[InputRef], list[ShardTask], PlanStats]:
    """The bucket's listed inputs that the output does not hold: new images (to be cut
    into shards with the other buckets' new images), the missing shards of new or
    partly labelled videos as fresh tasks, and counts. An overwrite passes an empty
    ``held`` (the output is cleared before labelling)."""
    refs = unique_sorted(collapse_frame_folders(listed))
    images = [r for r in refs if not is_video_uri(r.uri) and r.image_id not in held.done]
    videos = [r for r in refs if is_video_uri(r.uri) and r.image_id not in held.done]
    stats = PlanStats(listed=len(refs), new_images=len(images), new_videos=len(videos))
    tasks = [fresh_task(s, prints) for s in cut_videos(videos, source, video)] if videos else []
    refuse_recut(tasks, held)
    tasks = [t for t in tasks if held.missing(t)]
    count_fresh(stats, tasks)
    return images, tasks, stats


def refuse_recut(tasks: Sequence[ShardTask], held: Held) -> None:
    """A partly labelled video must be finished with the cut it was started with: other
    ``video.shard_frames``/``overlap_frames`` would label its frames twice."""
    cut: dict[str, set[str]] = defaultdict(set)
    for t in tasks:
        cut[t.shard.image_ids[0]].add(t.shard_id)
    for video, ids in cut.items():
        started = held.video_shards.get(video, frozenset())
        if not started <= ids:
            uri = next(t.shard.uris[0] for t in tasks if t.shard.image_ids[0] == video)
            raise SettingsChanged(
                f"video {uri} is partly labelled with other video.shard_frames/overlap_frames "
                f"(shards {sorted(started - ids)[:3]}): finish it with the earlier settings, "
                "or label into a new output"
            )


def stale_work(
    output: Location, bucket: int, prints: ConceptPrints, retry_errors: bool
) -> tuple[list[ShardTask], PlanStats]:
    """The bucket's committed shards whose labels are not current (or had errors, with
    ``retry_errors``), as tasks."""
    stats = PlanStats()
    tasks = []
    for row in current_shards(output, bucket).to_pylist():
        shard, current = shard_from_row(row)
        if retry_errors and row["errors"]:
            task = fresh_task(shard, prints)
            task = ShardTask(
                shard,
                task.concepts,
                task.prints,
                drop=tuple(sorted(set(current) - set(task.concepts))),
                fresh=True,
                previous_files=tuple(possible_files(shard.shard_id, [*current, *task.concepts])),
                first=False,
            )
        else:
            task = stale_task(shard, current, prints)
        if task is None:
            continue
        tasks.append(task)
        stats.kinds[shard.kind] = stats.kinds.get(shard.kind, 0) + 1
        target = dict(task.prints)
        edited = [c for c in task.concepts if c in current and current[c] != target[c]]
        if edited or task.drop:
            stats.changed_by.add(row["run_id"])
        for cid in task.concepts:
            kind = "added" if cid not in current else "edited" if cid in edited else "retried"
            stats.count(cid, kind, len(shard))
        for cid in task.drop:
            stats.count(cid, "removed", len(shard))
        if task.concepts:
            stats.relabel_shards += 1
            stats.relabel_inputs += len(shard)
        else:
            stats.drop_shards += 1
    return tasks, stats


def tasks_table(tasks: Sequence[ShardTask]) -> pa.Table:
    return pa.Table.from_pylist([task_row(t) for t in tasks], schema=TASK_SCHEMA)


def consolidate_bucket(
    output: Location, run_id: str, bucket: int, plan_rows: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[Mapping[str, Any]]]:
    """Fold what ``run_id`` committed in one shard bucket into the shards table.

    Returns (index rows of the inputs labelled for the first time, plan rows of the
    tasks that never committed).
    """
    done = committed(output, run_id, bucket)
    rows, index, lost = [], [], []
    for row in plan_rows:
        if row["shard_id"] in done:
            rows.append(shard_row(row, run_id, done[row["shard_id"]]))
            index += index_rows(row)
        else:
            lost.append(row)
    write_bucket(output, SHARDS_DIR, bucket, run_id, pa.Table.from_pylist(rows, SHARDS_SCHEMA))
    return index, lost


def write_index(output: Location, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Index rows of one run, one file per image bucket (small runs; clusters group first)."""
    from sam3ray.output.state import bucket_of

    by_bucket: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_bucket[bucket_of(row["image_id"])].append(row)
    for bucket, part in by_bucket.items():
        table = pa.Table.from_pylist(list(part), schema=INDEX_SCHEMA)
        write_bucket(output, INDEX_DIR, bucket, run_id, table)


def remove_leftovers(output: Location, lost: Iterable[Mapping[str, Any]]) -> int:
    """Delete what uncommitted fresh tasks of a dead run may have written (their inputs
    are planned again, possibly in other shards: nothing of them may stay visible)."""
    from sam3ray.output.layout import marker_path, staging_path

    n = 0
    for row in lost:
        if not row["first"]:
            continue  # a committed shard keeps its files; its state says what to redo
        sid = row["shard_id"]
        for relpath in (*row["previous"], marker_path(sid), staging_path(sid)):
            output.child(relpath).delete()
        n += 1
    return n
