"""Commit stage (CPU tasks): write a labelled shard, images and videos alike.

Order: a video shard's staging file, then the shard's detection files and its
images file, then its marker, then the run's commit key (``output.state``): so a
marker always implies complete files, and a commit key a marker. A task that
relabels some concepts of a committed shard merges with what is there
(``output.relabel``): the other concepts' files stay, the images rows are
recounted. Writing is idempotent (same names, keys last), so a write that fails
transiently after the storage client's own retries is redone whole.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from sam3ray.core.shards import ShardTask
from sam3ray.output.relabel import (
    accepted_inputs,
    carried_over,
    current_images,
    kept_counts,
    merge_images,
    merge_staging,
    only,
)
from sam3ray.output.state import commit_key, possible_files
from sam3ray.output.video import owned_rows, write_staging
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.stages.base import Resources
from sam3ray.stages.tasks import CommitSummary, ShardResult
from sam3ray.storage.location import Location
from sam3ray.storage.retry import RetryPolicy, retry_transient

#: CPUs each commit task asks for (small: it only serialises Parquet).
COMMIT_CPUS = 0.25


class CommitStage:
    """ShardResult → CommitSummary."""

    name = "commit"

    def __init__(self, output: Location, run_id: str) -> None:
        self.output = output
        self.run_id = run_id
        self.resources = Resources(cpus=COMMIT_CPUS)

    def setup(self) -> None:
        """Nothing heavy: the filesystem is built lazily per process."""

    def _output(self, result: ShardResult) -> tuple[ShardOutput, pa.Table | None]:
        """What to write (and the staging table of a video shard)."""
        task: ShardTask = result.task
        shard = task.shard
        det, img, staging = result.detections, result.images, result.staging
        previous, kept_files = task.previous_files, ()
        if not task.fresh:
            old = current_images(self.output, shard.shard_id)
            if shard.kind == "video":
                staging = merge_staging(
                    self.output, shard.shard_id, staging, (*task.concepts, *task.drop)
                )
                staging = _stamped(staging, self.run_id)  # kept tracks are rewritten too
                det = owned_rows(staging, shard.span.owned, shard.span.index)
                counts = Counter(det.column("image_id").to_pylist())
                held = [c for c, _ in task.prints]
                previous = tuple(possible_files(shard.shard_id, [*held, *task.drop]))
            else:
                counts, kept_files = kept_counts(self.output, shard.shard_id, task.kept)
                accepted = accepted_inputs(old, img)
                unreached = {
                    r["image_id"] for r in old.select(["image_id", "status"]).to_pylist()
                } - accepted
                kept = carried_over(self.output, shard.shard_id, task.concepts, unreached)
                det = pa.concat_tables([only(det, accepted), _stamped(kept, self.run_id)])
                counts.update(det.column("image_id").to_pylist())
            img = merge_images(old, img, counts, self.run_id)
        out = ShardOutput(
            shard_id=shard.shard_id,
            run_id=self.run_id,
            detections=det,
            images=img,
            prints=task.prints,
            previous_files=previous,
            kept_files=tuple(kept_files),
            commit_key=commit_key(
                self.run_id, shard.shard_id, "error" in img.column("status").to_pylist()
            ),
        )
        return out, staging

    def process(self, result: ShardResult) -> CommitSummary:
        shard = result.task.shard
        writer = ShardWriter(self.output)

        def commit():
            out, staging = self._output(result)
            if staging is not None:
                write_staging(self.output, shard.shard_id, staging)
            return writer.write(out), out

        # Each read and write retries on its own; this retries the shard once more as a
        # whole (idempotent: deterministic names), for a failure between them.
        retry_transient(commit, f"writing shard {shard.shard_id}", _SHARD_AGAIN)
        return CommitSummary.of(result)


_SHARD_AGAIN = RetryPolicy(retries=2, base_delay=1.0, max_delay=5.0)


def _stamped(table: pa.Table, run_id: str) -> pa.Table:
    """Old rows this commit writes again carry its run id, as every row it writes (the
    writer refuses rows of another run; ``merge_images`` does the same for images)."""
    i = table.schema.get_field_index("run_id")
    run = pa.array([run_id] * table.num_rows, table.schema.field(i).type)
    return table.set_column(i, table.schema.field(i), run)
