"""``Location`` (a URI with its storage options) and the one retry policy."""
