"""Time no-op reconcile passes of an in-process agentctl Controller (helper of bench/run.py).

Run by bench/run.py with the Python that has agentctl installed, against a manifests dir
and a state dir whose agents are already running (left there by a CLI controller that was
stopped without --stop-agents-on-exit). It builds its Settings with agentctl's own
argument parser, so it sees exactly what `agentctl run` would, then:

  1. opens the Controller and runs its loop (no file watcher, no health loop, no HTTP):
     the first pass adopts every live instance (timed as `adopt_first_pass_s`);
  2. --passes times: `Controller.resync()` (what the periodic resync does: stat the
     manifest dir's files, re-read changed ones, reconcile the agents whose inputs changed
     or whose processes are no longer watched) and waits for the loop to publish a quiet
     state. Wall time, CPU time (process_time), and a split into sync_manifests /
     per-agent reconciles (the `observe` hook that feeds
     agentctl_reconcile_duration_seconds) / publish / the rest (dispatch, asyncio);
  3. optionally profiles one more pass with cProfile (--cprofile FILE: pstats dump);
  4. stops every agent (`shutdown(stop_agents=True)`) unless --leave-agents.

Prints one JSON object on stdout. Only public-ish Controller members are used: open,
run, resync, quiet, ready, observe, on_publish, sync_manifests, publish, shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import logging
import statistics
import sys
import time
from typing import Any


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--manifests", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--base-dir", required=True)
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--max-pass-seconds", type=float, default=1e9,
                   help="stop after this many seconds of passes (but run at least 3)")
    p.add_argument("--cprofile", default=None, help="write a pstats file of one extra pass here")
    p.add_argument("--leave-agents", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0)
    return p.parse_args()


async def main(ns: argparse.Namespace) -> dict[str, Any]:
    from controller.cli import build_settings, parser
    from controller.reconciler import Controller

    args = parser().parse_args(["run", "--manifests", ns.manifests, "--state-dir", ns.state_dir,
                                "--base-dir", ns.base_dir, "--resync", "3600"])
    settings = build_settings(args)
    c = Controller(settings)
    c.open()

    reconciles: list[float] = []
    c.observe = lambda result, seconds: reconciles.append(seconds)
    split = {"sync": 0.0, "publish": 0.0}
    orig_sync, orig_publish = c.intake.sync, c.publish

    def timed_sync(*a: Any, **k: Any) -> None:
        t = time.perf_counter()
        try:
            orig_sync(*a, **k)
        finally:
            split["sync"] += time.perf_counter() - t

    def timed_publish(*a: Any, **k: Any) -> None:
        t = time.perf_counter()
        try:
            orig_publish(*a, **k)
        finally:
            split["publish"] += time.perf_counter() - t

    c.intake.sync = timed_sync  # type: ignore[method-assign]
    c.publish = timed_publish  # type: ignore[method-assign]

    gc_time = {"t": 0.0, "n": 0, "start": 0.0}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_time["start"] = time.perf_counter()
        else:
            gc_time["t"] += time.perf_counter() - gc_time["start"]
            gc_time["n"] += info.get("generation", 0) == 2

    gc.callbacks.append(on_gc)
    done = asyncio.Event()
    armed = {"on": True}

    def on_publish() -> None:
        if armed["on"] and c.ready and c.quiet() and not c.manifests_changed:
            armed["on"] = False
            done.set()

    c.on_publish.append(on_publish)
    stop = asyncio.Event()
    t0 = time.perf_counter()
    runner = asyncio.get_running_loop().create_task(c.run(stop))
    await asyncio.wait_for(done.wait(), ns.timeout)
    first = time.perf_counter() - t0
    n_agents, n_inst = len(c.agents), len(c.instances)

    async def one_pass(prof: cProfile.Profile | None = None) -> dict[str, float]:
        await asyncio.sleep(0.05)
        if prof is not None:
            prof.enable()
        reconciles.clear()
        split["sync"] = split["publish"] = 0.0
        gc_time["t"], gc_time["n"] = 0.0, 0
        done.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        armed["on"] = True
        c.resync()  # synchronous part: today sweep_orphans (a /proc environ scan) and marking
        resync_call = time.perf_counter() - w0
        await asyncio.wait_for(done.wait(), ns.timeout)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if prof is not None:
            prof.disable()
        rec = sum(reconciles)
        return {"wall_s": wall, "cpu_s": cpu, "reconciles": len(reconciles), "reconcile_sum_s": rec,
                "sync_s": split["sync"], "publish_s": split["publish"],
                "gc_s": gc_time["t"], "gc_full": gc_time["n"],
                "resync_call_s": resync_call,
                "other_s": max(0.0, wall - rec - split["sync"] - split["publish"] - resync_call)}

    passes: list[dict[str, float]] = []
    for _ in range(ns.passes):
        passes.append(await one_pass())
        if len(passes) >= 3 and sum(p["wall_s"] for p in passes) > ns.max_pass_seconds:
            break
    if ns.cprofile:
        prof = cProfile.Profile()
        await one_pass(prof)
        prof.dump_stats(ns.cprofile)
    stop.set()
    await runner
    t1 = time.perf_counter()
    await c.shutdown(stop_agents=not ns.leave_agents)
    stop_s = time.perf_counter() - t1

    def med(key: str) -> float:
        return statistics.median(p[key] for p in passes) if passes else float("nan")

    return {"agents": n_agents, "instances": n_inst, "adopt_first_pass_s": first, "passes": passes,
            "wall_p50_s": med("wall_s"), "wall_max_s": max((p["wall_s"] for p in passes), default=None),
            "cpu_p50_s": med("cpu_s"), "reconcile_sum_p50_s": med("reconcile_sum_s"),
            "reconciles_p50": med("reconciles"),
            "sync_p50_s": med("sync_s"), "publish_p50_s": med("publish_s"), "other_p50_s": med("other_s"), "resync_call_p50_s": med("resync_call_s"),
            "gc_p50_s": med("gc_s"), "gc_full_p50": med("gc_full"), "gc_objects": len(gc.get_objects()),
            "stop_all_s": stop_s}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    ns = parse()
    out = asyncio.run(main(ns))
    print(json.dumps(out))
