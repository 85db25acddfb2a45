"""Replay or explore schedules: `python -m tests.sim --seed N -v` prints one schedule step by step;
`python -m tests.sim --from 0 --count 5000` runs many and prints the first failing seed."""

from __future__ import annotations

import argparse
import sys
import time

from tests.sim.driver import InvariantViolation, run_seed


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sim")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--from", dest="first", type=int, default=0)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("-v", "--verbose", action="store_true")
    ns = p.parse_args()
    seeds = [ns.seed] if ns.seed is not None else range(ns.first, ns.first + ns.count)
    started = time.monotonic()
    for n, seed in enumerate(seeds, 1):
        try:
            run_seed(seed, steps=ns.steps, verbose=ns.verbose)
        except InvariantViolation as exc:
            print(exc)
            return 1
    print(f"{n} schedules passed in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
