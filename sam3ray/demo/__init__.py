"""Demo and test material: sample images and videos, the demo's preparation (CLI and tests only)."""
