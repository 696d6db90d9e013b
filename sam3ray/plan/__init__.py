"""The job plan (reads only): shards for images and videos, fingerprints, resume decisions."""
