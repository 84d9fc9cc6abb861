"""Mount tests: a real snapfs mounted through FUSE (conftest.SnapfsMount) and driven with
real tools. Every test here is marked `mount` (tests/conftest.py)."""
