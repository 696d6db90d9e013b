"""Scheduled-job entry point: pre-label images with SAM 3 (same as `sam3ray run`).

python jobs/prelabel_images.py configs/s3-images.yaml --set output.mode=resume
"""

from __future__ import annotations

import sys

from sam3ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
