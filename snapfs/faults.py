"""Fault injection: make the daemon die at a named point, for the crash tests and the soak.

`SNAPFS_FAULT=NAME[:N]` makes the daemon `os._exit` the N-th time (default the first) it
reaches `fault_point(NAME)`, after logging which point it died at. Nothing is flushed,
closed or unmounted: to the store this is a `kill -9` at exactly that moment, which makes
the crash matrix (`tests/crash/test_crash_matrix.py`) deterministic. Several faults may be given,
comma-separated; the first one reached ends the process.

`SNAPFS_FAULT_TRACE=1` instead logs every point reached with its hit count, so a soak run
can learn which (point, N) a workload reaches and then pick kill points among them.

The variables are read once, at import: with neither set `fault_point` tests one boolean.
The points, and why each is dangerous, are listed in POINTS (and in docs/ARCHITECTURE.md,
Crash safety).
"""

from __future__ import annotations

import logging
import os
import sys

from snapfs.errors import InvalidParameter

log = logging.getLogger(__name__)

FAULT_ENV = "SNAPFS_FAULT"
TRACE_ENV = "SNAPFS_FAULT_TRACE"
EXIT_STATUS = 137  # what a shell reports for kill -9, so a fault looks like one

# name -> the moment it stands for. A point not listed here makes the daemon refuse to
# start (see `check_configuration`), so a typo in SNAPFS_FAULT cannot silently test nothing.
POINTS: dict[str, str] = {
    "object_written": "a block object is written (not synced, no index row names it)",
    "delta_written": "a delta object is written over a pinned base (not synced, no row)",
    "clone_mapped": "a clone took its parent's map; nothing written into it, not closed",
    "writer_synced": "a writer's batch of objects is synced, its index commit not yet made",
    "writer_committed": "a writer's batch is committed (more of the file is still to come)",
    "seal": "the last writer closed and everything is flushed; the seal is not committed",
    "cp_copy_block": "a `cp` copy's block matched the source's (progress counted in memory)",
    "move_inserted": "`mv`: destination and job rows committed, the source not yet hidden",
    "copy_chained": "a copy's destination relative to its ancestor's copy, and its job, committed",
    "copy_batch_written": "a copy batch's objects are written, neither synced nor committed",
    "copy_batch_synced": "a copy batch's objects are synced, its commit not yet made",
    "copy_batch_committed": "a copy batch and its resume point are committed",
    "copy_finished": "a copy job's end is committed, its source not yet released",
    "gc_rows_dropped": "garbage collection dropped index rows, their objects still exist",
    "gc_delta_dropped": "collection dropped delta rows: their bases lost those references",
    "gc_object_deleted": "garbage collection deleted one object of a batch",
    "fold_step": "a deleted snapshot's rows: one batch folded into its children, not all",
    "rebase_step": "a sealed snapshot being made relative to its reference: one step done",
    "purge_chunk": "a deleted snapshot's block map: one chunk of rows gone, the rest not yet",
    "retention_released": "retention released one expired snapshot; others may be due",
    "recover_removed": "mount: an unfinished snapshot's rows were removed, others may remain",
    "orphan_deleted": "mount: one orphaned object deleted, the scan not finished",
    "pack_uploaded": "a pack of a bucket region is uploaded, its locations not committed",
    "pack_reclaimed": "mount: one pack's unmapped bytes punched out, other packs not yet",
}


def _parse(spec: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"{FAULT_ENV}: unknown fault point {name!r}")
        try:
            armed[name] = int(count) if count else 1
        except ValueError:
            raise ValueError(f"{FAULT_ENV}: {item!r} is not NAME[:N]") from None
        if armed[name] < 1:
            raise ValueError(f"{FAULT_ENV}: {item!r}: N counts from 1")
    return armed


def _load() -> tuple[dict[str, int], str | None]:
    try:
        return _parse(os.environ.get(FAULT_ENV, "")), None
    except ValueError as exc:
        return {}, str(exc)


_armed, _configuration_error = _load()
_tracing = os.environ.get(TRACE_ENV, "") not in ("", "0")
_active = bool(_armed) or _tracing
_hits: dict[str, int] = {}


def check_configuration() -> None:
    """Refuse to run with a SNAPFS_FAULT that names no known point (the daemon calls this)."""
    if _configuration_error is not None:
        raise InvalidParameter(_configuration_error)
    if _armed:
        log.warning("fault injection armed: %s", ", ".join(f"{k}:{v}" for k, v in _armed.items()))


def fault_point(name: str) -> None:
    """Die here if SNAPFS_FAULT says so (the N-th time this point is reached)."""
    if not _active:
        return
    if _tracing:
        _hits[name] = _hits.get(name, 0) + 1
        log.info("fault point %s reached (hit %d)", name, _hits[name])
    remaining = _armed.get(name)
    if remaining is None:
        return
    _armed[name] = remaining - 1
    if remaining > 1:
        return
    log.critical("fault injection: dying at %s (%s)", name, POINTS[name])
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_STATUS)
