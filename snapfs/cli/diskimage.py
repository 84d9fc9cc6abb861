"""Generated disk-like images for the demo, the tests and the benchmarks.

An image is a run of extents, 64 KiB to 4 MiB long and 64 KiB aligned like a filesystem's
allocation: by default 60% zero (free space), 20% random (compressed or encrypted files) and
20% text-like (logs, source, configuration). The same seed gives the same bytes, so two runs
of a benchmark compare like with like.

    python -m snapfs.diskimage create IMG --size 2G [--seed 1] [--zeros 0.6]
    python -m snapfs.diskimage mutate IMG --fraction 0.05 [--block-size 1M] [--seed 2]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

EXTENT_UNIT = 64 << 10
_WORDS = (
    b"the of and to in is for on with as by at from kernel block inode write read sync "
    b"snapshot region copy error warning info debug user root home var log etc usr lib "
    b"config value true false null none 0 1 2 3 42 100 1024 4096 2026 request response "
    b"server client timeout retry http get put delete status ok fail pass"
).split()


def _text_pool(rng: random.Random, size: int = 8 << 20) -> bytes:
    out = bytearray()
    while len(out) < size:
        line = b" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        out += b"%d %s\n" % (rng.randint(0, 1 << 30), line)
    return bytes(out[:size])


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def create(
    path: Path, size: int, *, seed: int = 1, zeros: float = 0.6, random_share: float = 0.5
) -> None:
    """Write a disk-like image of `size` bytes; non-zero extents are half random, half text."""
    rng = random.Random(seed)
    pool = _text_pool(rng)
    with open(path, "wb") as f:
        f.truncate(size)
        offset = 0
        while offset < size:
            length = min(rng.randint(1, 64) * EXTENT_UNIT, size - offset)
            roll = rng.random()
            if roll >= zeros:
                if (roll - zeros) / (1 - zeros) < random_share:
                    data = rng.randbytes(length)
                else:
                    start = rng.randrange(0, len(pool) - length) if length < len(pool) else 0
                    data = (pool * (1 + length // len(pool)))[start : start + length]
                f.seek(offset)
                f.write(data)
            offset += length


def mutate(path: Path, fraction: float, *, block_size: int = 1 << 20, seed: int = 2) -> int:
    """Overwrite `fraction` of the image's blocks with new random data; returns bytes changed."""
    rng = random.Random(seed)
    size = path.stat().st_size
    blocks = max(1, size // block_size)
    chosen = rng.sample(range(blocks), max(1, round(blocks * fraction)))
    changed = 0
    with open(path, "r+b") as f:
        for block_no in sorted(chosen):
            f.seek(block_no * block_size)
            length = min(block_size, size - block_no * block_size)
            f.write(rng.randbytes(length))
            changed += length
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m snapfs.diskimage")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create")
    p.add_argument("path", type=Path)
    p.add_argument("--size", default="2G")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--zeros", type=float, default=0.6)
    p = sub.add_parser("mutate")
    p.add_argument("path", type=Path)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--block-size", default="1M")
    p.add_argument("--seed", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "create":
        create(args.path, parse_size(args.size), seed=args.seed, zeros=args.zeros)
    else:
        changed = mutate(
            args.path, args.fraction, block_size=parse_size(args.block_size), seed=args.seed
        )
        print(changed)


if __name__ == "__main__":
    main()
