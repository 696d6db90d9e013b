"""Plain types, ids, the one URI helper, masks, error types (no heavy imports, no I/O)."""
