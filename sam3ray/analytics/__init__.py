"""Read-side tools over a finished output: stats, COCO / Label Studio export, HTML preview."""

from sam3ray.analytics.scan import (
    BATCH_ROWS,
    Category,
    batches,
    categories,
    check_output,
    connect,
    open_output,
    read_runs,
    scan,
    select_categories,
    sql_list,
    stream,
    write_file,
)

__all__ = [
    "BATCH_ROWS",
    "Category",
    "batches",
    "categories",
    "check_output",
    "connect",
    "open_output",
    "read_runs",
    "scan",
    "select_categories",
    "sql_list",
    "stream",
    "write_file",
]
