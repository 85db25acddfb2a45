"""Idle memory, /metrics and `get` of one controller tree, side by side with another.

    python3 bench/memory.py --n 100 [--tree /path/to/other/checkout ...] [--scrapes 9] [--gets 7]

For each tree (default: this repo) in turn: `python -m controller run` (with that tree first on
PYTHONPATH, the same interpreter and packages) over N `sleep` agents, waits until all run and
the RSS is flat, then prints RSS, the largest mappings of /proc/PID/smaps, the p50 of
/metrics scrapes spaced 1.1 s apart (each pays the /proc pass; the usage cache is 1 s) and of
whole `get -o json` and `get` commands. Loopback only; everything under one /tmp dir; stops
the controller with --stop-agents-on-exit, then kills what is left by the process groups it
recorded. Not a test: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mappings(pid: int, top: int) -> list[tuple[int, str]]:
    """(Rss KiB, mapping) summed by file (anonymous ones by their name: [heap], [anon]...)."""
    sums: dict[str, int] = {}
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            sums[name] = sums.get(name, 0) + int(head[1])
    return sorted(((v, k) for k, v in sums.items()), reverse=True)[:top]


def get(port: int, path: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        return resp.status, resp.read()


def wait(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
        except (OSError, ValueError):
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def measure(tree: Path, n: int, scrapes: int, gets: int, top: int) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="agentctl-bench-memory-"))
    man, state = root / "manifests", root / "state"
    man.mkdir()
    for i in range(n):
        (man / f"a{i:04d}.yaml").write_text(
            f"apiVersion: agentctl/v1\nkind: Agent\nmetadata: {{name: a{i:04d}}}\nspec: {{command: [sleep, '100000']}}\n")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = open(root / "controller.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "controller", "run", "--manifests", str(man), "--state-dir",
                             str(state), "--metrics-addr", "127.0.0.1:0", "--stop-agents-on-exit"],
                            stdout=log, stderr=log, env=env, start_new_session=True, cwd=root)
    pgids = {proc.pid}
    res: dict[str, object] = {"tree": str(tree), "n": n}
    try:
        port = wait(lambda: int(json.loads((state / "controller.json").read_text())["metricsAddr"].rsplit(":", 1)[1]),
                    60, "controller.json")

        def all_running() -> bool:
            items = json.loads(get(port, "/api/v1/agents")[1])["items"]
            for doc in items:
                for inst in doc.get("instances") or []:
                    if inst.get("pid"):
                        pgids.add(inst["pid"])  # process adapter: each instance leads its own group
            return len(items) == n and all(d.get("phase") == "Running" for d in items)
        wait(all_running, 300, "all agents running")
        # flat RSS: three readings 1 s apart within 64 KiB
        readings: list[int] = []
        for _ in range(60):
            readings.append(rss_kib(proc.pid))
            if len(readings) >= 3 and max(readings[-3:]) - min(readings[-3:]) <= 64:
                break
            time.sleep(1.0)
        res["rss_kib"] = readings[-1]
        res["mappings"] = mappings(proc.pid, top)
        times = []
        for i in range(scrapes):
            if i:
                time.sleep(1.1)
            t0 = time.perf_counter()
            code, body = get(port, "/metrics")
            times.append(time.perf_counter() - t0)
            assert code == 200
        res["metrics_p50_ms"] = statistics.median(times) * 1000
        res["metrics_bytes"] = len(body)
        for label, extra in (("get_json", ["-o", "json"]), ("get_table", [])):
            runs = []
            for _ in range(gets):
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "controller", "get", *extra, "--state-dir", str(state)],
                                     env=env, capture_output=True, cwd=root, timeout=60)
                runs.append(time.perf_counter() - t0)
                assert out.returncode == 0, out.stderr
            res[f"{label}_p50_ms"] = statistics.median(runs) * 1000
        res["rss_after_kib"] = rss_kib(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pgid in pgids:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        log.close()
        shutil.rmtree(root, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--tree", action="append", type=Path, default=[])
    ap.add_argument("--scrapes", type=int, default=9)
    ap.add_argument("--gets", type=int, default=7)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    print(f"load: {os.getloadavg()}", flush=True)
    for tree in a.tree or [REPO]:
        r = measure(tree.resolve(), a.n, a.scrapes, a.gets, a.top)
        maps = r.pop("mappings")
        print(json.dumps(r), flush=True)
        for kib, name in maps:  # type: ignore[attr-defined]
            print(f"    {kib:7d} KiB  {name}")
    print(f"load: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
