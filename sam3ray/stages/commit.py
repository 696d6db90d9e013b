"""Commit stage (CPU tasks): write a labelled shard, images and videos alike.

Order: a video shard's staging file, then the shard's detection files and its
images file, then its marker (``output.writer``), so a marker always implies
complete files (and, for video, a staging file). Writing is idempotent (same
names, marker last), so a write that fails transiently after the storage
client's own retries is redone whole with a longer backoff.
"""

from __future__ import annotations

from sam3ray.output.video import write_staging
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.stages.base import Resources
from sam3ray.stages.tasks import CommitSummary, ShardResult
from sam3ray.storage.location import Location
from sam3ray.storage.retry import WRITES, retry_transient

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

    def process(self, result: ShardResult) -> CommitSummary:
        task = result.task
        shard = task.shard
        out = ShardOutput(
            shard_id=shard.shard_id,
            members_hash=shard.members_hash,
            settings_hash=shard.settings_hash,
            run_id=self.run_id,
            detections=result.detections,
            images=result.images,
            previous_files=task.previous_files,
        )
        writer = ShardWriter(self.output)

        def commit():
            if result.staging is not None:
                write_staging(self.output, shard.shard_id, result.staging)
            return writer.write(out)

        marker = retry_transient(commit, f"writing shard {shard.shard_id}", WRITES)
        return CommitSummary.of(result, marker.n_ok, marker.n_error)
