"""snapfs: a FUSE filesystem that makes cloud-style disk snapshots plain files."""

__version__ = "0.1.0"
