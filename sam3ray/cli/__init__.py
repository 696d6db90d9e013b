"""The ``sam3ray`` command line (the only package that prints)."""

from sam3ray.cli.main import main

__all__ = ["main"]
