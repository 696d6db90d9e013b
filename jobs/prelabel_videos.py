"""Scheduled-job entry point for video lakes (same as `sam3ray run`; videos and images
are told apart by extension, so one config may hold both).

    python jobs/prelabel_videos.py configs/videos.yaml
"""

from __future__ import annotations

import sys

from sam3ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
