"""Crash tests: the daemon killed at named fault points or at random, the power cut under
the store (powercutfs.py), and the verification that nothing sealed was lost. Every test here
is marked `mount` (tests/conftest.py); `scripts/soak` runs the same workloads for longer."""
