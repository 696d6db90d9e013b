"""How every output file is serialised and read back (one format decision, one place)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from sam3ray.storage.location import Location
from sam3ray.storage.retry import READS, retry_transient


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a table the way every output file is written (zstd, statistics,
    row groups of ~64 MiB in memory, no dictionary for mask bytes)."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        row_group_size=max(1024, 64 * 1024 * 1024 // bytes_per_row),
        write_statistics=True,
        use_dictionary=[n for n in table.column_names if n != "mask_rle"],
    )
    return sink.getvalue().to_pybytes()


def read_table(loc: Location, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file through fsspec (what the writer wrote, read back whole; retried,
    so a throttled read never means "no such rows")."""

    def read() -> pa.Table:
        with loc.open("rb") as f:
            return pq.read_table(f, columns=columns)

    return retry_transient(read, f"read {loc.uri}", READS)
