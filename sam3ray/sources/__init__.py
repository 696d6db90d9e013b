"""What a job reads: input listings and manifests, image and video decoding, prompt tables."""
