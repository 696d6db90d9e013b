"""SAM 3 itself (the only package that imports torch and sam3): compat, arch, loader, engines."""
