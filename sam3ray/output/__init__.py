"""The output: its layout, schemas, markers, writer, reconciliation, readers, video state."""
