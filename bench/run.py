#!/usr/bin/env python3
"""bench/run.py - agentctl next to supervisord and circus, in one run, with one command.

    python3 bench/run.py            # full run, about 12 minutes on 2 cores
    python3 bench/run.py --quick    # about 3 minutes, smaller N and fewer trials
    python3 bench/run.py --profile  # also py-spy profiles: cold start, respawn, idle, adoption, /metrics

What it does (docs/performance.md has the method and a real run's table):

 1. set-up: a private venv (default /tmp/agentctl-bench-venv) with supervisor and circus
    (and py-spy for --profile) from PyPI; agentctl is the repo's .venv/bin/agentctl, or,
    without that venv, an editable install of this repo into the private venv;
 2. peers: ../shared/bench/peers.py (beside the repo) in a subprocess with
    --systems supervisord,circus,manifestdir, where manifestdir launches
    `agentctl run --manifests {manifests} --state-dir {state} --metrics-addr
    127.0.0.1:{port} --stop-agents-on-exit`: cold start, idle RSS/CPU, crash -> respawn,
    manifest add -> alive, manifest delete -> gone, graceful stop, all in the same run;
 3. agentctl-only, at N = 100/500/1000/5000 (--scale-n): cold start through the CLI,
    idle RSS/CPU (per thread)/fds, timed GET /metrics and `agentctl get -o json`, crash -> respawned and manifest
    written/deleted -> running/gone with a cheap probe, controller SIGKILLed and restarted
    with N live agents (time to /readyz 200, duplicates by AGENTCTL_INSTANCE, restarts
    from the status files, pids kept), then no-op reconcile passes timed in-process by
    bench/noop_pass.py (a Controller on the same state dir; the agents are SIGKILLed by
    pid afterwards, or stopped by the Controller with --stop-all);
 4. one file edited in a tree of 20,000 suspended agents (--edit-n): a rename over one
    manifest resumes its agent (-> process running) and another suspends it (-> gone);
 5. prints one markdown table (peers, agentctl, ratios, targets) plus the scaling table,
    and writes them with every sample to /tmp/bench-results/agentctl-<time>/results.{json,md}.

Safety: loopback only (a free 127.0.0.1 port per controller); every file under one
mkdtemp dir /tmp/agentctl-bench-*; every wait is bounded; this process is a child
subreaper, so agents orphaned by a SIGKILLed controller are reaped here; teardown kills
only pids this run started: the controllers it launched (by pid) and processes whose
argv[0] lies in this run's private bin/ dir (by pid, after reading /proc); never by name.
Standard library only; Python >= 3.9.
"""
from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(REPO), "shared", "bench", "peers.py")
RESULTS_DIR = "/tmp/bench-results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER_PINS = ["supervisor==4.3.0", "circus==0.19.0"]  # the versions of shared/bench/RESULTS.md


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------

def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_argv0(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace") if raw else None


def stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rfind(")") + 2:].split()


def is_alive(pid: int) -> bool:
    st = stat_fields(pid)
    return bool(st) and st[0] not in ("Z", "X", "x")


def cpu_ticks(pid: int) -> int | None:
    st = stat_fields(pid)
    return int(st[11]) + int(st[12]) if st else None


def thread_ticks(pid: int) -> dict[int, int]:
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                s = f.read()
        except OSError:
            continue
        st = s[s.rfind(")") + 2:].split()
        out[int(t)] = int(st[11]) + int(st[12])
    return out


def status_of(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def rss_mib(pid: int) -> float | None:
    v = status_of(pid).get("VmRSS")
    return int(v.split()[0]) / 1024 if v else None


def num_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def nofile_soft(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return line.split()[3]
    except OSError:
        pass
    return None


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    return env


def become_subreaper() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except Exception:  # noqa: BLE001
        return False


def reap(pids) -> None:
    """waitpid only the given pids (orphaned agents re-parented to us), never -1."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(1, math.ceil(p / 100.0 * len(s))) - 1]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------

def run_quiet(argv: list[str], timeout: float = 600) -> None:
    r = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"set-up failed: {shlex.join(argv)}\n{r.stdout.decode(errors='replace')[-2000:]}")


def setup(a: argparse.Namespace) -> dict[str, str]:
    venv = a.venv
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        log(f"set-up: creating {venv}")
        run_quiet([sys.executable, "-m", "venv", venv])
    want = []
    if not a.skip_peers and not (os.path.exists(os.path.join(venv, "bin", "supervisord"))
                                 and os.path.exists(os.path.join(venv, "bin", "circusd"))):
        want += PEER_PINS
    if a.profile and not os.path.exists(os.path.join(venv, "bin", "py-spy")):
        want.append("py-spy")
    if want:
        log(f"set-up: pip install {' '.join(want)} into {venv}")
        run_quiet([py, "-m", "pip", "install", "-q", *want])
    agentctl = a.agentctl
    if agentctl is None:
        repo_bin = os.path.join(REPO, ".venv", "bin", "agentctl")
        if os.path.exists(repo_bin):
            agentctl = repo_bin
        else:
            agentctl = os.path.join(venv, "bin", "agentctl")
            if not os.path.exists(agentctl):
                log(f"set-up: pip install -e {REPO} into {venv}")
                run_quiet([py, "-m", "pip", "install", "-q", "-e", REPO])
    agentctl = os.path.abspath(agentctl)
    r = subprocess.run([agentctl, "--version"], check=False, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"{agentctl} --version failed: {r.stderr.decode(errors='replace')}")
    agentctl_py = os.path.join(os.path.dirname(agentctl), "python")
    return {"venv": venv, "agentctl": agentctl, "agentctl_python": agentctl_py,
            "agentctl_version": (r.stdout or r.stderr).decode().strip(),
            "py_spy": os.path.join(venv, "bin", "py-spy")}


# --------------------------------------------------------------------------
# one run's private world: marker binaries, manifests, controllers, cleanup
# --------------------------------------------------------------------------

class World:
    def __init__(self, keep: bool):
        self.root = tempfile.mkdtemp(prefix="agentctl-bench-", dir="/tmp")
        self.bin = os.path.join(self.root, "bin")
        os.makedirs(self.bin)
        self.keep = keep
        self.sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
        self.procs: list[subprocess.Popen] = []
        self.seen_agents: set = set()

    def marker(self, name: str) -> str:
        path = os.path.join(self.bin, "agent." + name)
        if not os.path.lexists(path):
            os.symlink(self.sleep, path)
        return path

    def agents(self) -> dict[int, str]:
        """pid -> name of every live process whose argv[0] is one of our markers."""
        prefix = os.path.join(self.bin, "agent.")
        out = {}
        for ent in os.listdir("/proc"):
            if ent.isdigit():
                a0 = read_argv0(int(ent))
                if a0 and a0.startswith(prefix) and is_alive(int(ent)):
                    out[int(ent)] = a0[len(prefix):]
        self.seen_agents |= set(out)
        return out

    def launch(self, argv: list[str], logname: str) -> subprocess.Popen:
        with open(os.path.join(self.root, logname), "ab") as logf:
            p = subprocess.Popen(argv, cwd=self.root, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def sweep(self) -> int:
        """SIGKILL by pid whatever this run started that is still alive; reap it."""
        killed = 0
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                    killed += 1
                except OSError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for _ in range(20):
            pids = list(self.agents())
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass
            time.sleep(0.05)
            reap(pids)
        reap(self.seen_agents)
        return killed

    def close(self) -> None:
        self.sweep()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def manifest_text(name: str, marker: str) -> str:
    # the same Agent as peers.py's manifestdir adapter writes (JSON strings are YAML scalars)
    return "\n".join(["# written by bench/run.py", "apiVersion: agentctl/v1", "kind: Agent",
                      "metadata:", f"  name: {json.dumps(name)}", "spec:", "  command:",
                      f"    - {json.dumps(marker)}", '    - "100000"', "  restartPolicy: Always",
                      "  backoff:", "    initialSeconds: 0", ""])


def time_gone(pid: int, since: float, interval: float) -> float | None:
    """Seconds from `since` until pid is gone (reaped here), None after 30 s."""
    t = wait_until(lambda: not is_alive(pid), timeout=30, interval=interval)
    reap([pid])
    return None if t is None else t - since


def wait_until(pred: Callable[[], bool], timeout: float, interval: float) -> float | None:
    end = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if pred():
            return now
        if now > end:
            return None
        time.sleep(interval)


def restarts_from_status(state: str) -> tuple[int, int]:
    """(sum of top-level `restarts:`, number of status files) from <state>/status/*.yaml."""
    total = files = 0
    d = os.path.join(state, "status")
    for fn in os.listdir(d) if os.path.isdir(d) else []:
        if not fn.endswith(".yaml") or fn.startswith("."):
            continue
        try:
            with open(os.path.join(d, fn)) as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"^restarts: (\d+)\s*$", text, re.MULTILINE)
        if m:
            total += int(m.group(1))
            files += 1
    return total, files


def metric_value(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


# --------------------------------------------------------------------------
# agentctl-only scenarios at one N
# --------------------------------------------------------------------------

def scale_at(n: int, w: World, env: dict[str, str], a: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"n": n}
    d = os.path.join(w.root, f"scale-{n}")
    manifests, state = os.path.join(d, "manifests"), os.path.join(d, "state")
    os.makedirs(manifests)
    names = [f"s{n}x{i:04d}" for i in range(n)]
    for name in names:
        with open(os.path.join(manifests, name + ".yaml"), "w") as f:
            f.write(manifest_text(name, w.marker(name)))
    port = free_loopback_port()
    argv = [env["agentctl"], "run", "--manifests", manifests, "--state-dir", state,
            "--base-dir", d, "--metrics-addr", f"127.0.0.1:{port}", "--resync", "3600"]
    res["argv"] = shlex.join(argv)
    prefix = os.path.join(w.bin, "agent.")
    known: dict[int, str] = {}

    def live_children(ctl: int) -> dict[str, int]:
        out = {}
        for pid in children(ctl):
            name = known.get(pid)
            if name is None:
                a0 = read_argv0(pid)
                if a0 and a0.startswith(prefix):
                    name = known[pid] = a0[len(prefix):]
            if name is not None:
                out[name] = pid
        return out

    # -- cold start through the CLI
    t0 = time.perf_counter()
    ctl = w.launch(argv, f"controller-{n}-a.log")
    t_all = wait_until(lambda: len(live_children(ctl.pid)) >= n or ctl.poll() is not None,
                       timeout=60 + 0.1 * n, interval=0.01)
    if t_all is None or ctl.poll() is not None:
        raise RuntimeError(f"N={n}: cold start did not finish ({len(live_children(ctl.pid))}/{n} alive)")
    res["cold_all_alive_s"] = t_all - t0
    res["cold_cpu_s"] = (cpu_ticks(ctl.pid) or 0) / CLK_TCK
    t_ready = wait_until(lambda: _ready(port), timeout=30, interval=0.01)
    res["cold_readyz_s"] = None if t_ready is None else t_ready - t0
    log(f"agentctl N={n}: cold start {res['cold_all_alive_s']:.2f}s "
        f"(cpu {res['cold_cpu_s']:.2f}s), /readyz after {res['cold_readyz_s']:.2f}s")

    # -- idle footprint
    time.sleep(a.scale_settle)
    th0, c0, w0 = thread_ticks(ctl.pid), cpu_ticks(ctl.pid), time.perf_counter()
    time.sleep(a.scale_idle if n < 1000 else a.scale_idle_big)
    th1, c1, w1 = thread_ticks(ctl.pid), cpu_ticks(ctl.pid), time.perf_counter()
    res["idle_cpu_pct"] = 100.0 * (c1 - c0) / CLK_TCK / (w1 - w0)
    res["idle_cpu_main_pct"] = 100.0 * (th1.get(ctl.pid, 0) - th0.get(ctl.pid, 0)) / CLK_TCK / (w1 - w0)
    res["idle_threads_ticks"] = {str(t): th1[t] - th0.get(t, 0) for t in th1}
    if n >= 1000:
        # steady state: log rotation learns each new log's write rate with looks at 0.1, 0.3, 0.7,
        # 1.5, 3.1, 6.3 s after its start, then every 10 s; the window above, 1 s after the last
        # start, still holds that ramp (a start-up cost); this one opens after it
        time.sleep(max(0.0, t_all + a.scale_steady_after - time.perf_counter()))
        c2, w2 = cpu_ticks(ctl.pid), time.perf_counter()
        time.sleep(a.scale_idle_big)
        c3, w3 = cpu_ticks(ctl.pid), time.perf_counter()
        res["idle_steady_cpu_pct"] = 100.0 * (c3 - c2) / CLK_TCK / (w3 - w2)
    res["rss_mib"] = rss_mib(ctl.pid)
    res["fds"] = num_fds(ctl.pid)
    res["fd_soft_limit"] = nofile_soft(ctl.pid)
    res["threads"] = len(th1)

    # -- /metrics: spaced > 1 s so each scrape does its /proc pass (the usage cache is 1 s)
    scrapes, size, text = [], 0, ""
    for i in range(a.scrapes):
        if i:
            time.sleep(1.1)
        s0 = time.perf_counter()
        code, body = http_get(port, "/metrics")
        scrapes.append(time.perf_counter() - s0)
        if code != 200:
            raise RuntimeError(f"N={n}: /metrics answered {code}")
        size, text = len(body), body.decode("utf-8", "replace")
    res["metrics_s"] = scrapes
    res["metrics_p50_s"], res["metrics_max_s"] = median(scrapes), max(scrapes)
    res["metrics_bytes"] = size
    res["metrics_series"] = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    cnt = metric_value(text, "agentctl_reconcile_duration_seconds_count")
    tot = metric_value(text, "agentctl_reconcile_duration_seconds_sum")
    res["hist_reconcile_mean_s"] = (tot / cnt) if cnt else None
    res["rss_after_scrapes_mib"] = rss_mib(ctl.pid)
    # -- `agentctl get -o json`: the whole command, as a person or a script runs it
    gets = []
    for _ in range(a.gets):
        g0 = time.perf_counter()
        r = subprocess.run([env["agentctl"], "get", "-o", "json", "--state-dir", state], check=False,
                           capture_output=True, timeout=120)
        gets.append(time.perf_counter() - g0)
        if r.returncode != 0:
            raise RuntimeError(f"N={n}: agentctl get -o json exited {r.returncode}: {r.stderr[-300:]!r}")
    res["get_json_s"], res["get_json_p50_s"] = gets, median(gets)
    log(f"agentctl N={n}: idle cpu {res['idle_cpu_pct']:.2f}% rss {res['rss_mib']:.1f} MiB; "
        f"/metrics p50 {res['metrics_p50_s'] * 1000:.1f} ms ({size // 1024} KiB); "
        f"get -o json p50 {res['get_json_p50_s'] * 1000:.0f} ms")

    # -- churn at this N: crash -> respawned, manifest written -> running, deleted -> gone
    names_cycle = sorted(live_children(ctl.pid))
    lat: list[float] = []
    for i in range(min(a.scale_respawns, len(names_cycle))):
        name = names_cycle[(i * 7919) % len(names_cycle)]  # spread over the fleet
        old = live_children(ctl.pid).get(name)
        if old is None:
            continue
        t0 = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        t1 = wait_until(lambda name=name, old=old: (p := live_children(ctl.pid).get(name)) not in (None, old)
                        and is_alive(p), timeout=10, interval=0.002)
        reap([old])
        if t1 is not None:
            lat.append(t1 - t0)
        time.sleep(0.05 + (i % 5) * 0.05)
    res["respawn_s"] = lat
    res["respawn_p50_s"], res["respawn_p95_s"] = pct(lat, 50), pct(lat, 95)
    adds, rems = [], []
    for i in range(a.scale_adds):
        name = f"s{n}add{i:03d}"
        tmp = os.path.join(manifests, f".tmp-{name}.yaml")
        with open(tmp, "w") as f:
            f.write(manifest_text(name, w.marker(name)))
        t0 = time.perf_counter()
        os.rename(tmp, os.path.join(manifests, name + ".yaml"))
        t1 = wait_until(lambda name=name: name in live_children(ctl.pid), timeout=30, interval=0.002)
        if t1 is not None:
            adds.append(t1 - t0)
        time.sleep(0.1)
        pid = live_children(ctl.pid).get(name)
        t0 = time.perf_counter()
        os.unlink(os.path.join(manifests, name + ".yaml"))
        if pid is not None and (gone := time_gone(pid, t0, 0.002)) is not None:
            rems.append(gone)
        time.sleep(0.1)
    res["add_s"], res["remove_s"] = adds, rems
    res["add_p50_s"], res["remove_p50_s"] = pct(adds, 50), pct(rems, 50)
    log(f"agentctl N={n}: respawn p50 {_fmt(res['respawn_p50_s'] and res['respawn_p50_s'] * 1000, 1)} ms, "
        f"add p50 {_fmt(res['add_p50_s'] and res['add_p50_s'] * 1000, 0)} ms, "
        f"remove p50 {_fmt(res['remove_p50_s'] and res['remove_p50_s'] * 1000, 0)} ms")
    wait_until(lambda: len(live_children(ctl.pid)) == n, timeout=10, interval=0.05)

    # -- adoption: SIGKILL the controller with N live agents, start it again
    before = live_children(ctl.pid)
    r_before, _ = restarts_from_status(state)
    ctl.kill()
    ctl.wait(timeout=10)
    time.sleep(0.2)
    t0 = time.perf_counter()
    ctl2 = w.launch(argv, f"controller-{n}-b.log")
    t_ready = wait_until(lambda: _ready(port) or ctl2.poll() is not None, timeout=60, interval=0.005)
    res["adopt_readyz_s"] = None if t_ready is None or ctl2.poll() is not None else t_ready - t0
    time.sleep(a.adopt_settle)
    agents = w.agents()
    per_inst: dict[str, int] = {}
    ctl_ids = set()
    for pid in agents:
        e = environ(pid)
        per_inst[e.get("AGENTCTL_INSTANCE", "?")] = per_inst.get(e.get("AGENTCTL_INSTANCE", "?"), 0) + 1
        ctl_ids.add(e.get("AGENTCTL_CONTROLLER_ID"))
    after = {name: pid for pid, name in agents.items()}
    r_after, files = restarts_from_status(state)
    res["adopt_alive"] = len(agents)
    res["adopt_duplicates"] = sum(c - 1 for c in per_inst.values() if c > 1)
    res["adopt_instances_over_1"] = sorted(k for k, c in per_inst.items() if c > 1)[:10]
    res["adopt_replaced"] = sum(1 for k, pid in before.items() if after.get(k) != pid)
    res["adopt_restarts_delta"] = r_after - r_before
    res["adopt_status_files"] = files
    res["adopt_controller_ids"] = len(ctl_ids)
    res["adopt_rss_mib"] = rss_mib(ctl2.pid)
    log(f"agentctl N={n}: SIGKILL+restart -> /readyz {_fmt(res['adopt_readyz_s'], 2)}s, "
        f"{res['adopt_alive']} alive, {res['adopt_duplicates']} duplicates, "
        f"{res['adopt_replaced']} replaced, restarts +{res['adopt_restarts_delta']}")

    # -- no-op passes in-process: SIGTERM (agents stay), then bench/noop_pass.py adopts them
    ctl2.send_signal(signal.SIGTERM)
    ctl2.wait(timeout=30)
    helper = [env["agentctl_python"], os.path.join(REPO, "bench", "noop_pass.py"),
              "--manifests", manifests, "--state-dir", state, "--base-dir", d, "--passes", str(a.passes),
              "--max-pass-seconds", str(a.max_pass_seconds)]
    if not a.stop_all:
        helper.append("--leave-agents")  # stop_all is O(N^2) today: 155 s at N=2000; SIGKILL them below
    if a.profile and n == a.profile_pass_n:
        res["cprofile"] = os.path.join(a.out_dir, f"noop-pass-{n}.pstats")
        helper += ["--cprofile", res["cprofile"]]
    with open(os.path.join(w.root, f"noop-{n}.log"), "ab") as errf:
        hp = subprocess.Popen(helper, cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=errf, start_new_session=True)
    w.procs.append(hp)
    out, _ = hp.communicate(timeout=120 + 0.05 * n)
    if hp.returncode != 0:
        raise RuntimeError(f"N={n}: noop_pass.py failed rc={hp.returncode}; see {w.root}/noop-{n}.log")
    noop = json.loads(out.decode().strip().splitlines()[-1])
    res["noop"] = noop
    log(f"agentctl N={n}: no-op pass p50 {noop['wall_p50_s'] * 1000:.1f} ms wall "
        f"(cpu {noop['cpu_p50_s'] * 1000:.1f} ms; reconciles {noop['reconcile_sum_p50_s'] * 1000:.1f}, "
        f"sync {noop['sync_p50_s'] * 1000:.1f}, publish {noop['publish_p50_s'] * 1000:.1f}; "
        f"{len(noop['passes'])} passes)" + (f"; stop all {noop['stop_all_s']:.2f}s" if a.stop_all else ""))
    if a.stop_all:
        left = wait_until(lambda: not w.agents(), timeout=10, interval=0.05)
        res["left_after_stop"] = 0 if left else len(w.agents())
    w.sweep()  # SIGKILL by pid what is left (all of it without --stop-all)
    return res


def edit_manifest_text(name: str, marker: str, suspended: bool) -> str:
    """A suspended agent (nothing runs) whose resume is one line of its manifest."""
    return manifest_text(name, marker).replace("  restartPolicy: Always\n",
                                               f"  restartPolicy: Always\n  suspend: {str(suspended).lower()}\n")


def edit_probe(n: int, w: World, env: dict[str, str], a: argparse.Namespace) -> dict[str, Any]:
    """N manifests of suspended agents under one controller; then, a.edits times, one file is edited
    the way a person resumes one agent (suspend: true -> false, written to a temporary file and
    renamed over the manifest, as editors and `kubectl apply`-style tools do): write -> its
    process running; and the edit back: write -> its process gone. Nothing else runs, so what is
    timed is the file event, the re-read, the reconcile and a fork+exec, against a tree of N."""
    res: dict[str, Any] = {"n": n}
    d = os.path.join(w.root, f"edit-{n}")
    manifests, state = os.path.join(d, "manifests"), os.path.join(d, "state")
    os.makedirs(manifests)
    edited = [f"e{n}x{(i * 7919) % n:05d}" for i in range(a.edits)]
    for i in range(n):
        name = f"e{n}x{i:05d}"
        # only the edited agents ever run: only they get a marker (the rest name one that is never made)
        marker = w.marker(name) if name in edited else os.path.join(w.bin, "agent." + name)
        with open(os.path.join(manifests, name + ".yaml"), "w") as f:
            f.write(edit_manifest_text(name, marker, True))
    port = free_loopback_port()
    argv = [env["agentctl"], "run", "--manifests", manifests, "--state-dir", state,
            "--base-dir", d, "--metrics-addr", f"127.0.0.1:{port}", "--resync", "3600"]
    res["argv"] = shlex.join(argv)
    t0 = time.perf_counter()
    ctl = w.launch(argv, f"controller-edit-{n}.log")
    t_ready = wait_until(lambda: _ready(port) or ctl.poll() is not None, timeout=60 + 0.02 * n, interval=0.05)
    if t_ready is None or ctl.poll() is not None:
        raise RuntimeError(f"edit N={n}: the controller was not ready")
    res["ready_s"] = t_ready - t0
    res["rss_mib"] = rss_mib(ctl.pid)
    time.sleep(1.0)
    prefix = os.path.join(w.bin, "agent.")

    def running(name: str) -> int | None:
        for pid in children(ctl.pid):
            if read_argv0(pid) == prefix + name and is_alive(pid):
                return pid
        return None

    def write(name: str, suspended: bool) -> float:
        path = os.path.join(manifests, name + ".yaml")
        tmp = os.path.join(manifests, f".{name}.yaml.tmp")
        with open(tmp, "w") as f:
            f.write(edit_manifest_text(name, w.marker(name), suspended))
        t = time.perf_counter()
        os.rename(tmp, path)
        return t

    resumed, suspended = [], []
    for name in edited:
        t_w = write(name, False)
        t_up = wait_until(lambda name=name: running(name) is not None, timeout=20, interval=0.001)
        if t_up is not None:
            resumed.append(t_up - t_w)
        time.sleep(0.2)
        pid = running(name)
        t_w = write(name, True)
        if pid is not None and (gone := time_gone(pid, t_w, 0.001)) is not None:
            suspended.append(gone)
        time.sleep(0.2)
    res["resume_s"], res["suspend_s"], res["edits"] = resumed, suspended, len(edited)
    res["resume_p50_s"], res["resume_p95_s"] = pct(resumed, 50), pct(resumed, 95)
    res["suspend_p50_s"], res["suspend_p95_s"] = pct(suspended, 50), pct(suspended, 95)
    res["cpu_s"] = (cpu_ticks(ctl.pid) or 0) / CLK_TCK
    ctl.send_signal(signal.SIGTERM)
    try:
        ctl.wait(timeout=60)
    except subprocess.TimeoutExpired:
        ctl.kill()
    log(f"edit N={n}: ready after {res['ready_s']:.1f}s, rss {res['rss_mib']:.1f} MiB; one file edited -> "
        f"running p50 {_fmt(res['resume_p50_s'] and res['resume_p50_s'] * 1000, 1)} ms "
        f"(p95 {_fmt(res['resume_p95_s'] and res['resume_p95_s'] * 1000, 1)}), -> gone p50 "
        f"{_fmt(res['suspend_p50_s'] and res['suspend_p50_s'] * 1000, 1)} ms; {len(resumed)}/{len(edited)} seen")
    w.sweep()
    return res


def _ready(port: int) -> bool:
    try:
        return http_get(port, "/readyz", timeout=1.0)[0] == 200
    except OSError:
        return False


def _fmt(x: float | None, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


# --------------------------------------------------------------------------
# profiles (py-spy)
# --------------------------------------------------------------------------

def summarize_raw(path: str, top: int = 15, main_only: bool = True) -> dict[str, Any]:
    """py-spy raw stacks (recorded with --threads --gil, so a sample is a moment in which
    that thread held the GIL, i.e. ran Python) -> samples per thread, and for the main
    (asyncio) thread the top functions by self and by inclusive samples, keyed
    file:function with line numbers dropped."""
    frame_re = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")

    def key(frame: str) -> str:
        m = frame_re.match(frame)
        if not m:
            return frame
        fn, file = m.group(1), m.group(2)
        for cut in ("site-packages/", "lib/python3.11/", "lib/python3.12/", "lib/python3.13/"):
            if cut in file:
                file = file.split(cut, 1)[1]
        return f"{file}:{fn}"

    threads: dict[str, int] = {}
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    main = 0
    try:
        lines = read_text(path).splitlines()
    except OSError:
        lines = []
    # the first frame is "thread (TID): NAME" or, in some samples, just "thread (TID)"
    names: dict[str, str] = {}
    for line in lines:
        head = line.split(";", 1)[0]
        if head.startswith("thread (") and ": " in head:
            tid, name = head.split(": ", 1)
            names[tid] = name
    for line in lines:
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit() or not stack:
            continue
        c = int(cnt)
        frames = stack.split(";")
        tid = frames[0].split(": ", 1)[0]
        tname = names.get(tid, tid) if frames[0].startswith("thread") else "?"
        threads[tname] = threads.get(tname, 0) + c
        if (tname != "MainThread") if main_only else (tname == "MainThread" or "AnyIO" in tname):
            continue
        keys = [key(f) for f in frames[1:]] or ["?"]
        main += c
        self_c[keys[-1]] = self_c.get(keys[-1], 0) + c
        for k in set(keys):
            incl[k] = incl.get(k, 0) + c
    top_self = sorted(self_c.items(), key=lambda kv: -kv[1])[:top]
    top_incl = sorted(((k, v) for k, v in incl.items()
                       if k.startswith("controller/") and not k.startswith(("controller/cli.py:main",
                                                                              "controller/cli.py:cmd_run",
                                                                              "controller/runner.py:run_controller"))),
                      key=lambda kv: -kv[1])[:top]
    return {"threads": threads, "main": main, "self": top_self, "inclusive": top_incl}


def summarize_pstats(path: str, top: int = 15) -> list[tuple[str, int, float, float]]:
    """cProfile dump -> [(file:function, calls, tottime s, cumtime s)] by tottime."""
    try:
        import pstats
        st = pstats.Stats(path)
    except Exception:  # noqa: BLE001 - another Python's marshal format, a missing file
        return []
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        short = file
        for cut in ("site-packages/", "lib/python3.11/", "lib/python3.12/", "/work/main/"):
            if cut in short:
                short = short.split(cut, 1)[1]
        rows.append((f"{short}:{line}:{fn}" if line else f"{short}:{fn}", nc, tt, ct))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def profile_run(n: int, w: World, env: dict[str, str], a: argparse.Namespace) -> dict[str, Any]:
    """py-spy on one CLI controller with N agents: cold start, idle, a burst of crashes, and
    a SIGKILL + restart (adoption). Each phase attaches py-spy to the controller's pid."""
    out: dict[str, Any] = {"n": n}
    d = os.path.join(w.root, f"profile-{n}")
    manifests, state = os.path.join(d, "manifests"), os.path.join(d, "state")
    os.makedirs(manifests)
    for i in range(n):
        name = f"p{n}x{i:04d}"
        with open(os.path.join(manifests, name + ".yaml"), "w") as f:
            f.write(manifest_text(name, w.marker(name)))
    port = free_loopback_port()
    argv = [env["agentctl"], "run", "--manifests", manifests, "--state-dir", state, "--base-dir", d,
            "--metrics-addr", f"127.0.0.1:{port}"]
    prefix = os.path.join(w.bin, "agent.p")

    def spy(phase: str, pid: int, rate: int) -> subprocess.Popen:
        raw = os.path.join(a.out_dir, f"profile-{phase}-{n}.txt")
        out[phase] = {"raw": raw}
        p = w.launch([env["py_spy"], "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                      "--output", raw, "--threads", "--gil"], f"py-spy-{phase}.log")
        out[phase]["t0"] = time.perf_counter()
        return p

    def stop_spy(p: subprocess.Popen, phase: str, main_only: bool = True) -> None:
        out[phase]["wall_s"] = round(time.perf_counter() - out[phase].pop("t0"), 2)
        p.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        out[phase].update(summarize_raw(out[phase]["raw"], main_only=main_only))

    def alive(ctl: int) -> dict[str, int]:
        res = {}
        for pid in children(ctl):
            a0 = read_argv0(pid)
            if a0 and a0.startswith(prefix) and is_alive(pid):
                res[a0] = pid
        return res

    ctl = w.launch(argv, f"controller-profile-{n}.log")
    sp = spy("cold", ctl.pid, a.profile_rate)  # attaches within ~0.1 s: some imports are missed
    wait_until(lambda: len(alive(ctl.pid)) >= n or ctl.poll() is not None, timeout=60 + 0.1 * n, interval=0.02)
    time.sleep(0.3)
    stop_spy(sp, "cold")
    time.sleep(2.0)
    sp = spy("idle", ctl.pid, a.profile_rate)
    time.sleep(a.profile_idle)
    stop_spy(sp, "idle")
    kids = sorted(alive(ctl.pid).items())
    sp = spy("respawn", ctl.pid, a.profile_rate)
    kills = min(a.profile_kills, len(kids))
    for i in range(kills):
        try:
            os.kill(kids[i][1], signal.SIGKILL)
        except OSError:
            pass
        time.sleep(0.02)
    out["respawn_kills"] = kills
    wait_until(lambda: len(alive(ctl.pid)) >= n, timeout=30, interval=0.02)
    time.sleep(0.3)
    stop_spy(sp, "respawn")
    sp = spy("metrics", ctl.pid, a.profile_rate)  # the HTTP handler threads, not the loop
    for i in range(5):
        if i:
            time.sleep(1.1)  # past the 1 s usage cache: every scrape reads /proc
        http_get(port, "/metrics")
    stop_spy(sp, "metrics", main_only=False)
    ctl.kill()
    ctl.wait(timeout=10)
    time.sleep(0.2)
    ctl2 = w.launch(argv, f"controller-profile-{n}-b.log")
    sp = spy("adopt", ctl2.pid, a.profile_rate)
    wait_until(lambda: _ready(port) or ctl2.poll() is not None, timeout=60, interval=0.01)
    time.sleep(0.3)
    stop_spy(sp, "adopt")
    ctl2.kill()  # agents are SIGKILLed by pid below
    ctl2.wait(timeout=10)
    w.sweep()
    return out


# --------------------------------------------------------------------------
# peers.py
# --------------------------------------------------------------------------

def run_peers(a: argparse.Namespace, env: dict[str, str], json_path: str) -> tuple[dict | None, str | None]:
    if not os.path.exists(PEERS):
        log(f"no {PEERS}: skipping the peers")
        return None, None
    mcmd = (f"{shlex.quote(env['agentctl'])} run --manifests {{manifests}} --state-dir {{state}} "
            f"--metrics-addr 127.0.0.1:{{port}} --stop-agents-on-exit")
    argv = [sys.executable, PEERS, "--systems", a.systems, "--n", a.peer_n, "--churn-n", a.churn_n,
            "--venv", env["venv"], "--manifest-cmd", mcmd, "--json", json_path,
            "--cold-reps", str(a.cold_reps), "--respawn-trials", str(a.respawn_trials),
            "--add-trials", str(a.add_trials), "--steady-window", str(a.steady_window),
            "--steady-settle", str(a.steady_settle), "--budget-s", str(a.peer_budget), "--seed", str(a.seed)]
    log("peers: " + shlex.join(argv))
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=a.peer_budget + 300)
    except BaseException:
        # peers.py tears down on SIGTERM (by pid, its own run dir only)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        raise
    if not os.path.exists(json_path):
        log(f"peers.py wrote no results (rc {p.returncode})")
        return None, None
    with open(json_path) as f:
        return json.load(f), out.decode(errors="replace")


# --------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------

def peer_cells(peers: dict, system: str, n: int) -> dict[str, Any]:
    r = next((x for x in peers["results"] if x["system"] == system and x["n"] == n), None)
    if r is None:
        return {}
    c: dict[str, Any] = {}
    cold = [x["all_alive_s"] for x in r.get("cold", [])]
    c["cold"] = median(cold)
    c["cold_n"] = len(cold)
    if "steady" in r:
        c["rss"], c["cpu"] = r["steady"]["rss_mib"], r["steady"]["cpu_pct"]
    for k in ("respawn", "add", "remove"):
        if k in r and r[k]["latency_s"]:
            c[k + "_p50"], c[k + "_p95"] = pct(r[k]["latency_s"], 50), pct(r[k]["latency_s"], 95)
            c[k + "_fails"] = r[k]["fails"]
    c["stop"] = r.get("stop_s")
    if r.get("stop_s") is None and r.get("stop_cap_s"):
        c["stop_capped"] = r["stop_cap_s"]
    if "error" in r:
        c["error"] = r["error"]
    return c


TARGETS = {  # (key, limit) at N=500 unless said; from the issue
    "respawn_p50": 0.010, "cpu": 0.5, "add_p50": 0.100, "remove_p50": 0.100, "cold": 1.5, "rss": 50.0,
}


def render(peers: dict | None, scale: list[dict], meta: dict, edit: dict | None = None) -> str:
    L: list[str] = []
    systems = [("supervisord", "supervisord"), ("circus", "circus")]
    if peers:
        ns = sorted({r["n"] for r in peers["results"]})
        L += ["### agentctl next to supervisord and circus (same run)", "",
              "Ratio = agentctl ÷ peer: below 1 means agentctl is faster / smaller.", "",
              "| metric | N | supervisord | circus | agentctl | ÷ supervisord | ÷ circus | target (N=500) | met |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        rows = [
            ("crash (SIGKILL) → respawned, ms p50", "respawn_p50", 1000, 0),
            ("crash → respawned, ms p95", "respawn_p95", 1000, 0),
            ("manifest/config written → running, ms p50", "add_p50", 1000, 0),
            ("manifest/config deleted → gone, ms p50", "remove_p50", 1000, 0),
            ("cold start → all N alive, s (median)", "cold", 1, 2),
            ("idle CPU, % of one core", "cpu", 1, 2),
            ("idle RSS of the supervisor process, MiB", "rss", 1, 1),
            ("graceful stop (SIGTERM) → all gone, s", "stop", 1, 2),
        ]
        for title, key, mul, nd in rows:
            for n in ns:
                cells = {s: peer_cells(peers, s, n) for s in ("supervisord", "circus", "manifestdir")}
                vals = {s: cells[s].get(key) for s in cells}
                if all(v is None for v in vals.values()) and not any(c.get("stop_capped") for c in cells.values()):
                    continue

                def f(v: float | None, s: str, key: str = key, cells: dict = cells, mul: float = mul,
                      nd: int = nd) -> str:
                    if v is None and key == "stop" and cells.get(s, {}).get("stop_capped"):
                        return f"> {cells[s]['stop_capped']:g} (killed)"
                    return "-" if v is None else f"{v * mul:.{nd}f}"

                me = vals["manifestdir"]
                ratios = []
                for s, _ in systems:
                    pv = vals[s]
                    ratios.append("-" if me is None or not pv else f"{me / pv:.2g}" if me / pv < 10
                                  else f"{me / pv:.0f}")
                tgt = TARGETS.get(key) if n == 500 else None
                tcell = "-" if tgt is None else f"≤ {tgt * mul:g}"
                met = "-" if tgt is None or me is None else ("yes" if me <= tgt else
                                                               f"no ({me / tgt:.2f}×)")
                L.append(f"| {title} | {n} | {f(vals['supervisord'], 'supervisord')} | "
                         f"{f(vals['circus'], 'circus')} | {f(me, 'manifestdir')} | "
                         f"{ratios[0]} | {ratios[1]} | {tcell} | {met} |")
        errs = [(r["system"], r["n"], r["error"]) for r in peers["results"] if "error" in r]
        for s, n, e in errs:
            L.append(f"\n- error {s} N={n}: {e}")
        L.append("")
    if scale:
        L += ["### agentctl alone, growth with N", "",
              "| metric | " + " | ".join(f"N={r['n']}" for r in scale) + " | target |",
              "|---|" + "---:|" * len(scale) + "---|"]

        def row(title: str, f: Callable[[dict], str], target: str = "") -> None:
            L.append(f"| {title} | " + " | ".join(f(r) for r in scale) + f" | {target} |")

        ms = lambda x: "-" if x is None else f"{x * 1000:.1f}"
        row("cold start (CLI) → all alive, s", lambda r: _fmt(r.get("cold_all_alive_s"), 2), "≤ 1.5 at 500")
        row("  controller CPU during cold start, s", lambda r: _fmt(r.get("cold_cpu_s"), 2))
        row("idle RSS, MiB", lambda r: _fmt(r.get("rss_mib"), 1), "≤ 50 at 500")
        row("  RSS per agent above N=100, KiB", lambda r: _per_agent_kib(scale, r), "≤ 20 at 1000")
        row("idle CPU, % of a core (all threads; 10 s window at N ≥ 1000)",
            lambda r: _fmt(r.get("idle_cpu_pct"), 2), "≤ 0.2 at 100 and 1000")
        row("  of which the main (asyncio) thread", lambda r: _fmt(r.get("idle_cpu_main_pct"), 2))
        row("idle CPU, % of a core, steady (10 s window from 15 s after the last start; N ≥ 1000)",
            lambda r: _fmt(r.get("idle_steady_cpu_pct"), 2), "≤ 0.2 at 1000")
        row("open fds / soft RLIMIT_NOFILE", lambda r: f"{r.get('fds', '-')} / {r.get('fd_soft_limit', '-')}")
        row("crash → respawned, ms p50", lambda r: ms(r.get("respawn_p50_s")), "≤ 10 at 500")
        row("crash → respawned, ms p95", lambda r: ms(r.get("respawn_p95_s")))
        row("manifest written → running, ms p50", lambda r: ms(r.get("add_p50_s")), "≤ 100 at 500")
        row("manifest deleted → gone, ms p50", lambda r: ms(r.get("remove_p50_s")), "≤ 100 at 500")
        row("GET /metrics, ms p50", lambda r: ms(r.get("metrics_p50_s")), "≤ 30 at 1000")
        row("GET /metrics, ms max", lambda r: ms(r.get("metrics_max_s")))
        row("  /metrics size, KiB / series", lambda r: f"{r.get('metrics_bytes', 0) // 1024} / "
                                                        f"{r.get('metrics_series', '-')}")
        row("agentctl get -o json (whole command), ms p50 of 5", lambda r: ms(r.get("get_json_p50_s")),
            "≤ 200 at 1000")
        row("no-op reconcile pass (in-process), ms p50", lambda r: ms(r.get("noop", {}).get("wall_p50_s")),
            "≤ 50 at 1000")
        row("  agents reconciled in that pass (p50)", lambda r: _fmt(r.get("noop", {}).get("reconciles_p50"), 0),
            "only those whose inputs changed")
        row("  CPU of that pass, ms p50", lambda r: ms(r.get("noop", {}).get("cpu_p50_s")))
        row("  split: resync() call / sync manifests / per-agent reconciles / publish / rest, ms",
            lambda r: " / ".join(ms(r.get("noop", {}).get(k)) for k in
                                 ("resync_call_p50_s", "sync_p50_s", "reconcile_sum_p50_s", "publish_p50_s",
                                  "other_p50_s")))
        row("  of the pass: garbage collection, ms p50 (full collections)",
            lambda r: f"{ms(r.get('noop', {}).get('gc_p50_s'))} ({r.get('noop', {}).get('gc_full_p50', '-')})")
        row("  mean agentctl_reconcile_duration_seconds (cold start), ms",
            lambda r: ms(r.get("hist_reconcile_mean_s")))
        row("SIGKILL + restart → /readyz 200, s", lambda r: _fmt(r.get("adopt_readyz_s"), 2), "≤ 1 at 500")
        row("  duplicates (AGENTCTL_INSTANCE seen twice)", lambda r: str(r.get("adopt_duplicates", "-")),
            "0")
        row("  restarts counted (status files, after − before)",
            lambda r: str(r.get("adopt_restarts_delta", "-")), "0")
        row("  agents with a new pid (should be 0)", lambda r: str(r.get("adopt_replaced", "-")))
        row("  first in-process pass with adoption, s",
            lambda r: _fmt(r.get("noop", {}).get("adopt_first_pass_s"), 2))
        if any(r.get("left_after_stop") is not None for r in scale):
            row("stop all agents (in-process shutdown), s",
                lambda r: _fmt(r.get("noop", {}).get("stop_all_s"), 2))
        L.append("")
        growth = growth_1000_to_5000(scale)
        if growth:
            L += ["Growth from N=1000 to N=5000 (value at 5000 ÷ value at 1000; 5.0 is linear):", ""]
            L += [f"- {what}: {v1:g} → {v5:g} {unit}, ×{v5 / v1:.2f}" + (" (linear or better)" if v5 / v1 <= 5.0
                                                                          else " (**worse than linear**)")
                  for what, v1, v5, unit in growth]
            L.append("")
    if edit:
        L += [f"### One manifest edited in a tree of {edit['n']} (suspended agents; the edit resumes one)", ""]
        if "error" in edit:
            L.append(f"- error: {edit['error']}")
        else:
            L += ["| metric | value | target |", "|---|---:|---|",
                  f"| edit written (rename) → its process running, ms p50 / p95 | "
                  f"{_ms(edit.get('resume_p50_s'))} / {_ms(edit.get('resume_p95_s'))} | ≤ 100 p50 |",
                  f"| edit back (suspend) → its process gone, ms p50 / p95 | "
                  f"{_ms(edit.get('suspend_p50_s'))} / {_ms(edit.get('suspend_p95_s'))} | |",
                  f"| edits seen | {len(edit.get('resume_s', []))} of {a_edits(edit)} | |",
                  f"| controller start → /readyz 200 with {edit['n']} manifests, s | {_fmt(edit.get('ready_s'), 1)} | |",
                  f"| controller RSS, MiB | {_fmt(edit.get('rss_mib'), 1)} | |"]
        L.append("")
    return "\n".join(L)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def a_edits(edit: dict) -> int:
    return int(edit.get("edits", 0))


def _per_agent_kib(scale: list[dict], r: dict) -> str:
    base = next((x for x in scale if x["n"] == 100 and x.get("rss_mib")), None)
    if base is None or r["n"] <= 100 or not r.get("rss_mib"):
        return "-"
    return f"{(r['rss_mib'] - base['rss_mib']) * 1024 / (r['n'] - 100):.1f}"


def growth_1000_to_5000(scale: list[dict]) -> list[tuple[str, float, float, str]]:
    """What issue 16 asks to report with its growth from 1000 to 5000 agents."""
    by = {r["n"]: r for r in scale if "error" not in r}
    if 1000 not in by or 5000 not in by:
        return []
    r1, r5 = by[1000], by[5000]
    out = []
    for what, get, unit, mul in (
            ("cold start → all running", lambda r: r.get("cold_all_alive_s"), "s", 1),
            ("idle RSS", lambda r: r.get("rss_mib"), "MiB", 1),
            ("GET /metrics p50", lambda r: r.get("metrics_p50_s"), "ms", 1000),
            ("no-op reconcile pass p50", lambda r: r.get("noop", {}).get("wall_p50_s"), "ms", 1000),
            ("agentctl get -o json p50", lambda r: r.get("get_json_p50_s"), "ms", 1000)):
        v1, v5 = get(r1), get(r5)
        if v1 and v5:
            out.append((what, round(v1 * mul, 2), round(v5 * mul, 2), unit))
    return out


def targets_summary(peers: dict | None, scale: list[dict], edit: dict | None = None) -> list[dict[str, Any]]:
    out = []

    def add(what: str, value: float | None, limit: float, unit: str, mul: float = 1) -> None:
        if value is None:
            out.append({"target": what, "value": None, "limit": limit, "met": None})
            return
        out.append({"target": what, "value": round(value * mul, 3), "limit": limit, "unit": unit,
                    "met": value * mul <= limit, "factor": round(value * mul / limit, 2) if limit else None})

    if peers:
        c = peer_cells(peers, "manifestdir", 500)
        add("crash → respawned p50 at N=500 (peers.py probe, same run as the peers)", c.get("respawn_p50"), 10, "ms",
            1000)
        add("idle CPU at N=500 (same run)", c.get("cpu"), 0.5, "%")
        add("manifest written → running p50 at N=500", c.get("add_p50"), 100, "ms", 1000)
        add("manifest deleted → gone p50 at N=500", c.get("remove_p50"), 100, "ms", 1000)
        add("cold start of 500 → all alive", c.get("cold"), 1.5, "s")
        add("controller RSS at 500", c.get("rss"), 50, "MiB")
    by = {r["n"]: r for r in scale}
    if 500 in by:
        r = by[500]
        add("crash → respawned p50 at N=500 (bench/run.py probe: children list + 1 pid)", r.get("respawn_p50_s"),
            10, "ms", 1000)
        add("SIGKILL + restart with 500 live: /readyz 200", r.get("adopt_readyz_s"), 1.0, "s")
        add("  duplicates", r.get("adopt_duplicates"), 0, "")
        add("  restarts", r.get("adopt_restarts_delta"), 0, "")
    if 1000 in by:
        r = by[1000]
        add("no-op reconcile pass over 1000", r.get("noop", {}).get("wall_p50_s"), 50, "ms", 1000)
        add("/metrics scrape with 1000 agents (p50)", r.get("metrics_p50_s"), 30, "ms", 1000)
        add("agentctl get -o json with 1000 agents (p50 of 5)", r.get("get_json_p50_s"), 200, "ms", 1000)
        add("idle CPU with 1000 agents (10 s window 1 s after the last start)", r.get("idle_cpu_pct"), 0.2, "%")
        add("idle CPU with 1000 agents, steady (10 s window from 15 s after it)", r.get("idle_steady_cpu_pct"),
            0.2, "%")
    if 100 in by:
        add("idle CPU with 100 agents", by[100].get("idle_cpu_pct"), 0.2, "%")
    if edit and "error" not in edit:
        add(f"one file edited in a tree of {edit['n']} → applied (its process running), p50",
            edit.get("resume_p50_s"), 100, "ms", 1000)
    for what, v1, v5, _ in growth_1000_to_5000(scale):
        add(f"{what}: growth from 1000 to 5000 agents (5 = linear)", v5 / v1, 5.0, "×")
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1.5-2 min: N=100 for the peers, 100/500 alone")
    p.add_argument("--profile", action="store_true", help="also py-spy profiles (cold, respawn, idle)")
    p.add_argument("--profile-only", action="store_true", help="only the profiles (implies --profile)")
    p.add_argument("--profile-n", type=int, default=None, help="agents for the profiles (500)")
    p.add_argument("--venv", default="/tmp/agentctl-bench-venv", help="private venv for the peers, py-spy")
    p.add_argument("--agentctl", default=None, help="agentctl executable (default: repo .venv, else install)")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--systems", default="supervisord,circus,manifestdir")
    p.add_argument("--peer-n", default=None, help="N list for peers.py (full: 100,500; quick: 100)")
    p.add_argument("--churn-n", default=None, help="N at which respawn/add/remove run (full: 500)")
    p.add_argument("--scale-n", default=None,
                   help="N list for agentctl alone (full: 100,500,1000,5000; quick: 100,1000); up to 5000 "
                        "fits this host's limits (RLIMIT_NOFILE 20000, pid_max 32768)")
    p.add_argument("--edit-n", type=int, default=20000,
                   help="manifests in the tree of the one-file-edit probe (0: skip it)")
    p.add_argument("--stop-all", action="store_true",
                   help="let the in-process controller stop all agents (shutdown) and time it; slow at 2000")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep /tmp/agentctl-bench-* (logs, state)")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--markdown", default=None, help="also write the tables here")
    a = p.parse_args(argv)
    q = a.quick
    a.profile = a.profile or a.profile_only
    if a.profile_only:
        a.skip_peers = True
        a.skip_scale = a.scale_n is None  # with --scale-n: also the no-op pass cProfile there
    a.peer_n = a.peer_n or ("100" if q else "100,500")
    a.churn_n = a.churn_n or ("100" if q else "500")
    a.scale_n = [int(x) for x in (a.scale_n or ("100,1000" if q else "100,500,1000,5000")).split(",") if x]
    a.cold_reps = 1 if q else 3
    a.respawn_trials = 10 if q else 30
    a.add_trials = 5 if q else 20
    a.steady_window = 5 if q else 10
    a.steady_settle = 2 if q else 3
    a.peer_budget = 120 if q else 330
    a.scale_settle = 1.0
    a.scale_idle = 3.0 if q else 5.0
    a.scale_steady_after = 15.0  # seconds after the last start: log rotation's learning ramp is over
    a.scale_idle_big = 10.0  # at N >= 1000: a 10 s window resolves 0.1 % (10 ms ticks)
    a.gets = 5
    a.edits = 7 if q else 15
    a.scrapes = 3 if q else 5
    a.scale_respawns = 10 if q else 20
    a.scale_adds = 5 if q else 10
    a.adopt_settle = 1.0 if q else 2.0
    a.passes = 5 if q else 10
    a.max_pass_seconds = 5.0 if q else 12.0  # fewer passes (min 3) once they add up to this
    a.profile_n = a.profile_n or 500
    a.profile_pass_n = 1000 if 1000 in a.scale_n else max(a.scale_n)
    a.profile_idle = 10.0
    a.profile_rate = 250
    a.profile_kills = 200
    a.scale_budget = 150 if q else 420
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(a.out_dir, exist_ok=True)
    a.out_dir = os.path.join(a.out_dir, f"agentctl-{stamp}")
    os.makedirs(a.out_dir)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    env = setup(a)
    load0 = read_text("/proc/loadavg").split()[:3]
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "loadavg_start": load0, "agentctl": env["agentctl"], "agentctl_version": env["agentctl_version"],
        "mode": "quick" if a.quick else "full", "subreaper": become_subreaper(),
        "git": _git_rev(),
    }
    log(f"results in {a.out_dir}; {env['agentctl_version']} ({env['agentctl']}); loadavg {' '.join(load0)}")
    peers, scale, profile, edit = None, [], None, None
    w = World(a.keep)
    try:
        if not a.skip_peers:
            peers, _ = run_peers(a, env, os.path.join(a.out_dir, "peers.json"))
        if not a.skip_scale:
            t_scale = time.perf_counter()
            for n in a.scale_n:
                if time.perf_counter() - t_scale > a.scale_budget:
                    log(f"scale budget spent: skipping N={n}")
                    continue
                try:
                    scale.append(scale_at(n, w, env, a))
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - recorded, the next N still runs
                    log(f"agentctl N={n}: ERROR {type(e).__name__}: {e}")
                    scale.append({"n": n, "error": f"{type(e).__name__}: {e}"})
                finally:
                    w.sweep()
        if a.edit_n and not a.profile_only:
            try:
                edit = edit_probe(a.edit_n, w, env, a)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - recorded, the rest of the run still reports
                log(f"edit N={a.edit_n}: ERROR {type(e).__name__}: {e}")
                edit = {"n": a.edit_n, "error": f"{type(e).__name__}: {e}"}
            finally:
                w.sweep()
        if a.profile:
            profile = profile_run(a.profile_n, w, env, a)
    except KeyboardInterrupt as e:
        log(f"interrupted: {e}")
    finally:
        w.close()
        leftovers = w.agents() if os.path.isdir(w.bin) else {}
        meta["leftover_agents"] = len(leftovers)
        meta["loadavg_end"] = read_text("/proc/loadavg").split()[:3]
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    if peers:
        meta["peer_versions"] = peers["meta"].get("versions")
    table = render(peers, scale, meta, edit)
    summary = targets_summary(peers, scale, edit)
    head = (f"Run {meta['started']} on {meta['host']} ({meta['cpus']} CPUs, Linux {meta['kernel']}, "
            f"Python {meta['python']}), {meta['mode']} mode, {meta['agentctl_version']} at git {meta['git']}; "
            f"loadavg {' '.join(meta['loadavg_start'])} → {' '.join(meta['loadavg_end'])}; "
            f"wall {meta['wall_s']:.0f} s; leftover agents {meta['leftover_agents']}.")
    if peers:
        head += "\nPeers: " + "; ".join(f"{k}: {v}" for k, v in (meta.get("peer_versions") or {}).items())
    lines = [head, "", table, "### Targets", ""]
    for t in summary:
        if t["met"] is None:
            lines.append(f"- {t['target']}: not measured in this run (see --peer-n / --scale-n)")
        else:
            lines.append(f"- {t['target']}: {t['value']:g} {t.get('unit', '')} (limit {t['limit']:g}) → "
                         + ("met" if t["met"] else f"MISSED ({t['factor']:g}× the limit)"
                            if t["limit"] else "MISSED"))
    if profile:
        lines += ["", f"### Profiles (py-spy --gil --threads at {a.profile_rate} Hz, N={profile['n']})", ""]
        for phase in ("cold", "respawn", "idle", "adopt", "metrics"):
            p = profile.get(phase, {})
            thr = ", ".join(f"{k} {v}" for k, v in sorted(p.get("threads", {}).items(), key=lambda kv: -kv[1]))
            lines.append(f"**{phase}**: {p.get('wall_s', 0):.1f} s recorded; samples holding the GIL by thread: "
                         f"{thr or 'none'}; raw stacks {p.get('raw')}")
            lines.append("")
            lines.append("| self samples | function |")
            lines.append("|---:|---|")
            for k, v in p.get("self", [])[:12]:
                lines.append(f"| {v} | {k} |")
            lines.append("")
            lines.append("| inclusive samples | controller function |")
            lines.append("|---:|---|")
            for k, v in p.get("inclusive", [])[:12]:
                lines.append(f"| {v} | {k} |")
            lines.append("")
    cprof = next((r for r in scale if r.get("cprofile")), None)
    if cprof:
        rows = summarize_pstats(cprof["cprofile"])
        lines += ["", f"### cProfile of one no-op pass at N={cprof['n']} ({cprof['cprofile']})", "",
                  "| tottime ms | cumtime ms | calls | function |", "|---:|---:|---:|---|"]
        lines += [f"| {tt * 1000:.1f} | {ct * 1000:.1f} | {nc} | {k} |" for k, nc, tt, ct in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "peers": peers and peers.get("results"), "scale": scale, "edit": edit,
                   "targets": summary, "profile": profile}, f, indent=1, default=str)
    with open(os.path.join(a.out_dir, "results.md"), "w") as f:
        f.write(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    print(text)
    log(f"wrote {a.out_dir}/results.md and results.json")
    return 0 if meta["leftover_agents"] == 0 else 1


def _git_rev() -> str:
    try:
        r = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, timeout=10)
        rev = r.stdout.decode().strip()
        d = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "controller"],
                           check=False, capture_output=True, timeout=10)
        return rev + ("+dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
