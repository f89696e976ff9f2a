"""The decoder's fuzzer, run long: the seeded mutations of tests/test_fuzz_decode.py over many more cases.

A case fails when decode_image raises anything but a one-line DecodeError, returns anything but a uint8
``(size, size, 3)`` array, or takes longer than ``--slow`` seconds. Each failure is minimised (chunks of bytes
removed while it still fails the same way) and written to ``--out`` (tests/data/decode-crashers/ by default), where
the test suite replays it; add a line to that folder's README saying what it did.

    python -m bench.fuzz_decode --cases 200000 --seed 1          # ~1 minute per 60,000 cases on one core
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.test_fuzz_decode import CRASHERS, FUZZ_MAX_BYTES, check_case, mutated_cases


def failure(data: bytes, max_bytes: int, slow: float) -> str | None:
    """None when ``data`` behaves, else a short signature of how it failed (the exception type, or 'slow')."""
    started = time.perf_counter()
    try:
        check_case(data, max_bytes)
    except AssertionError as exc:
        return f"contract: {str(exc)[:80]}"
    except Exception as exc:  # noqa: BLE001 - an escaped exception is the finding
        return f"{type(exc).__module__}.{type(exc).__name__}"
    return "slow" if time.perf_counter() - started > slow else None


def minimise(data: bytes, fails: Callable[[bytes], bool], rounds: int = 8) -> bytes:
    """Delta debugging on bytes: drop ever smaller chunks while ``fails`` still holds."""
    chunk = max(1, len(data) // 2)
    for _ in range(rounds * 16):
        shrunk = False
        start = 0
        while start < len(data):
            candidate = data[:start] + data[start + chunk:]
            if candidate and fails(candidate):
                data, shrunk = candidate, True
            else:
                start += chunk
        if not shrunk:
            if chunk == 1:
                break
            chunk = max(1, chunk // 2)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1, help="the test suite runs seed 0")
    parser.add_argument("--max-bytes", type=int, default=FUZZ_MAX_BYTES,
                        help="decode_image's limit for the run (the default limit decodes bigger mutants, slower)")
    parser.add_argument("--slow", type=float, default=2.0, help="seconds past which a case counts as a failure")
    parser.add_argument("--out", default=str(CRASHERS))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    outcomes: Counter[str] = Counter()
    found: dict[str, tuple[str, bytes]] = {}
    slowest = (0.0, "")
    for name, data in mutated_cases(args.cases, args.seed):
        t0 = time.perf_counter()
        how = failure(data, args.max_bytes, args.slow)
        seconds = time.perf_counter() - t0
        slowest = max(slowest, (seconds, name))
        outcomes[how or "fine"] += 1
        if how and how not in found:
            found[how] = (name, data)
    print(f"{args.cases} cases (seed {args.seed}) in {time.perf_counter() - started:.1f} s: {dict(outcomes)}; "
          f"slowest {slowest[0] * 1e3:.0f} ms ({slowest[1]})")
    out = Path(args.out)
    for how, (name, data) in found.items():
        small = minimise(data, lambda d, h=how: failure(d, args.max_bytes, args.slow) == h)
        path = out / f"{name.split('/')[0]}-{hashlib.sha256(small).hexdigest()[:12]}.bin"
        out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(small)
        print(f"  {how}: {name}, {len(data)} -> {len(small)} bytes: {path}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
