#!/usr/bin/env python3
"""bench/soak.py - a bounded soak: a fleet of crashers and sleepers under churn; does the controller stay flat?

    python3 bench/soak.py                      # 100 agents, 3 minutes, 30 % crashers
    python3 bench/soak.py --agents 100 --minutes 3 --crashers 0.3 [--keep] [--markdown FILE]

What it does (docs/reliability.md, section "Soak", has a real run's table):

 1. a private dir /tmp/agentctl-soak-* with manifests/, state/ and the controller's log;
 2. N manifests, every one with `logs {maxBytes: 65536, backups: 2}` and `restartPolicy: Always`:
    - crashers (--crashers of N): `python3 -c` that runs a random 0.2-2 s, then exits 1;
      backoff {initialSeconds: 0.1, maxSeconds: 2};
    - chatty (3): write 64 KiB/s of output, so their logs rotate every couple of seconds;
    - liveness (2): print one line, then stay silent; liveness {logIdleSeconds: 4}, so
      they are restarted with reason LivenessFailed about every 4-6 s;
    - sleepers (the rest): `sleep 1000000`;
 3. `agentctl run --manifests M --state-dir S --metrics-addr 127.0.0.1:0 --stop-agents-on-exit`
    (the repo's .venv/bin/agentctl) in its own session; the HTTP port is read from
    S/controller.json, the marker from S/controller.id;
 4. for --minutes from the controller's start: every 5 s a sample of the controller's RSS
    (VmRSS), open fds, threads and CPU seconds (from /proc/<pid>), the live agent processes
    (every process whose environ holds AGENTCTL_CONTROLLER_ID=<id>; also: any instance seen
    twice), zombies among the controller's children, the time of GET /metrics, the sum of
    `restarts` over GET /api/v1/agents (it resets on a spec change) and of
    agentctl_agent_restarts_total (monotonic, but a deleted agent's series go), and the
    size of S/logs; every other sample the manifests churn: one manifest's env is edited
    (-> SpecChanged restart) and another one is deleted; the next sample re-creates it;
 5. a table and a verdict. After a warm-up of min(30 s, a quarter of the run) the samples
    are cut in thirds; RSS is flat if the median of the last third is <= 1.10 x the median
    of the first third; fds are flat if the median of the last third is <= the first
    third's + 5. The log dir is bounded if the sum of the log files is <= N x maxBytes x
    (backups + 1) + slack (slack: per chatty agent, 3 s of its output per file, plus 4 KiB
    per agent), no file exists beyond <log>.<backups>, and no single file is over maxBytes
    + 3 s of the fastest writer's output;
 6. SIGTERM to the controller (with --stop-agents-on-exit it stops its agents), a bounded
    wait, then a check by pid that no marked process is left: any leftover is SIGKILLed by
    pid and counted as a failure; the dir is removed unless --keep.

Safety: loopback only; every file under one mkdtemp dir; a hard time cap of --minutes + 1
minute (SIGALRM), after which the clean-up runs; this process becomes a child subreaper so
agents orphaned by the controller are reaped here (by their pid, never waitpid(-1));
processes are signalled only by pid (the controller, its own process group which it was
started as the leader of, and marked agents); never by name. Standard library only.
Exit status 0 if every verdict is good, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import Any

# the /proc, HTTP and reaping helpers are the benchmark's own (same directory, so on sys.path)
from run import become_subreaper, children, http_get, is_alive, log, reap, rss_mib, stat_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 5.0
MAX_BYTES = 65536
BACKUPS = 2
CHATTY_RATE = 64 * 1024  # bytes per second per chatty agent
ROTATE_EVERY = 2.0  # controller/health.py: the rotation looks every 2 s
RSS_TOLERANCE = 0.10
FD_TOLERANCE = 5

CRASHER = ("import random, sys, time\n"
           "print('crasher up', flush=True)\n"
           "time.sleep(random.uniform(0.2, 2.0))\n"
           "sys.exit(1)\n")
CHATTY = ("import sys, time\n"
          "line = 'y' * 1023 + '\\n'\n"
          "while True:\n"
          "    sys.stdout.write(line * 16)\n"
          "    sys.stdout.flush()\n"
          "    time.sleep(0.25)\n")
QUIET = ("import time\n"
         "print('up, then silent', flush=True)\n"
         "time.sleep(1e6)\n")


class HardCap(BaseException):
    pass


# --------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    st = stat_fields(pid)
    return (int(st[11]) + int(st[12])) / CLK_TCK if st is not None else None


def count_dir(path: str) -> int | None:
    try:
        return len(os.listdir(path))
    except OSError:
        return None


def zombies_among_children(pid: int) -> list[int]:
    return [c for c in children(pid) if (st := stat_fields(c)) and st[0] == "Z"]


def marked(controller_id: str) -> dict[int, str]:
    """pid -> AGENTCTL_INSTANCE of every live process whose environ holds AGENTCTL_CONTROLLER_ID=<id>."""
    needle = f"AGENTCTL_CONTROLLER_ID={controller_id}".encode()
    me = os.getpid()
    out: dict[int, str] = {}
    for ent in os.listdir("/proc"):
        if not ent.isdigit() or int(ent) == me:
            continue
        try:
            with open(f"/proc/{ent}/environ", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        items = raw.split(b"\0")
        if needle not in items:
            continue
        if not is_alive(int(ent)):
            continue
        inst = next((i[len(b"AGENTCTL_INSTANCE="):].decode("utf-8", "replace") for i in items
                     if i.startswith(b"AGENTCTL_INSTANCE=")), "?")
        out[int(ent)] = inst
    return out


def dir_bytes(path: str) -> tuple[int, int, list[str]]:
    """(sum of sizes, largest file, names) of the regular files in path."""
    total = largest = 0
    names: list[str] = []
    try:
        ents = list(os.scandir(path))
    except OSError:
        return 0, 0, names
    for e in ents:
        try:
            if e.is_file(follow_symlinks=False):
                size = e.stat(follow_symlinks=False).st_size
                total += size
                largest = max(largest, size)
                names.append(e.name)
        except OSError:
            pass
    return total, largest, names


# --------------------------------------------------------------------------
# the fleet
# --------------------------------------------------------------------------

def plan_fleet(n: int, crash_share: float) -> dict[str, str]:
    """name -> kind; the kinds: crasher, chatty, liveness, sleeper."""
    chatty = min(3, n)
    live = min(2, n - chatty)
    crashers = min(max(0, round(crash_share * n)), n - chatty - live)
    kinds = ["chatty"] * chatty + ["liveness"] * live + ["crasher"] * crashers
    kinds += ["sleeper"] * (n - len(kinds))
    return {f"soak-{kind[:5]}-{i:03d}": kind for i, kind in enumerate(kinds)}


def manifest_text(name: str, kind: str, gen: int, python: str, sleep: str) -> str:
    q = json.dumps
    if kind == "crasher":
        command = [python, "-c", CRASHER]
    elif kind == "chatty":
        command = [python, "-c", CHATTY]
    elif kind == "liveness":
        command = [python, "-c", QUIET]
    else:
        command = [sleep, "1000000"]
    lines = ["# written by bench/soak.py", "apiVersion: agentctl/v1", "kind: Agent", "metadata:",
             f"  name: {q(name)}", f"  labels: {{soak: {q(kind)}}}", "spec:", "  command:"]
    lines += [f"    - {q(c)}" for c in command]
    lines += ["  restartPolicy: Always", "  env:", f"    SOAK_KIND: {q(kind)}", f"    SOAK_GEN: {q(str(gen))}",
              f"  logs: {{maxBytes: {MAX_BYTES}, backups: {BACKUPS}}}",
              "  stop: {signal: SIGTERM, gracePeriodSeconds: 5}"]
    if kind == "crasher":
        lines.append("  backoff: {initialSeconds: 0.1, maxSeconds: 2}")
    elif kind == "liveness":
        lines.append("  backoff: {initialSeconds: 0.5, maxSeconds: 2}")
        lines.append("  liveness: {logIdleSeconds: 4}")
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".tmp-{base}")  # hidden: the controller ignores it
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------

class Soak:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.root = tempfile.mkdtemp(prefix="agentctl-soak-", dir="/tmp")
        os.chmod(self.root, 0o700)
        self.manifests = os.path.join(self.root, "manifests")
        self.state = os.path.join(self.root, "state")
        os.makedirs(self.manifests, mode=0o755)
        self.python = os.path.realpath(shutil.which("python3") or sys.executable)
        self.sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
        self.fleet = plan_fleet(a.agents, a.crashers)
        self.gen: dict[str, int] = {name: 0 for name in self.fleet}
        self.rng = random.Random(a.seed)
        self.ctl: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.controller_id = ""
        self.seen: set[int] = set()
        self.samples: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.deleted: str | None = None
        self.result: dict[str, Any] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.manifests, name + ".yaml")

    def write(self, name: str) -> None:
        write_atomic(self.path(name), manifest_text(name, self.fleet[name], self.gen[name], self.python, self.sleep))

    # -- controller ------------------------------------------------------------
    def start(self, deadline: float) -> float:
        for name in self.fleet:
            self.write(name)
        argv = [self.a.agentctl, "run", "--manifests", self.manifests, "--state-dir", self.state,
                "--base-dir", self.root, "--metrics-addr", "127.0.0.1:0", "--stop-agents-on-exit"]
        t0 = time.monotonic()
        with open(os.path.join(self.root, "controller.log"), "ab") as logf:
            self.ctl = subprocess.Popen(argv, cwd=self.root, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.ctl.poll() is not None:
                raise RuntimeError(f"controller exited {self.ctl.returncode}; see {self.root}/controller.log")
            if time.monotonic() > deadline:
                raise RuntimeError("controller not ready in time")
            try:
                with open(os.path.join(self.state, "controller.json")) as f:
                    info = json.load(f)
                if info.get("pid") == self.ctl.pid:
                    self.port = int(info["metricsAddr"].rsplit(":", 1)[1])
                    if http_get(self.port, "/readyz", timeout=2)[0] == 200:
                        break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        with open(os.path.join(self.state, "controller.id")) as f:
            self.controller_id = f.read().strip()
        log(f"controller pid {self.ctl.pid} ready after {time.monotonic() - t0:.2f}s on 127.0.0.1:{self.port}, "
            f"marker AGENTCTL_CONTROLLER_ID={self.controller_id}")
        return t0

    # -- one sample ------------------------------------------------------------
    def sample(self, t: float) -> dict[str, Any]:
        assert self.ctl is not None
        pid = self.ctl.pid
        s: dict[str, Any] = {"t": round(t, 1), "rss_mib": rss_mib(pid), "fds": count_dir(f"/proc/{pid}/fd"),
                             "threads": count_dir(f"/proc/{pid}/task"), "cpu_s": cpu_seconds(pid),
                             "zombie_pids": zombies_among_children(pid)}
        s["zombies"] = len(s["zombie_pids"])
        agents = marked(self.controller_id)
        self.seen |= set(agents)
        per: dict[str, int] = {}
        for inst in agents.values():
            per[inst] = per.get(inst, 0) + 1
        s["live"] = len(agents)
        s["duplicates"] = sum(c - 1 for c in per.values() if c > 1)
        s["duplicate_instances"] = sorted(k for k, c in per.items() if c > 1)
        try:
            t0 = time.perf_counter()
            code, body = http_get(self.port, "/metrics")
            s["metrics_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            s["metrics_code"] = code
            text = body.decode("utf-8", "replace")
            s["restarts_metric"] = int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                           if line.startswith("agentctl_agent_restarts_total{")))
        except (OSError, ValueError, IndexError) as exc:
            s["metrics_ms"], s["metrics_error"] = None, repr(exc)
        try:
            t0 = time.perf_counter()
            code, body = http_get(self.port, "/api/v1/agents")
            s["api_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            items = json.loads(body)["items"]
            s["restarts_api"] = sum(int(i.get("restarts") or 0) for i in items)
            phases: dict[str, int] = {}
            for i in items:
                phases[i.get("phase", "?")] = phases.get(i.get("phase", "?"), 0) + 1
            s["phases"] = phases
            s["agents_api"] = len(items)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            s["api_ms"], s["api_error"] = None, repr(exc)
        total, largest, _ = dir_bytes(os.path.join(self.state, "logs"))
        s["logs_kib"], s["largest_log_kib"] = total // 1024, largest // 1024
        reap(self.seen)  # agents orphaned to us (none expected while the controller lives)
        return s

    # -- churn -----------------------------------------------------------------
    def churn(self, tick: int) -> None:
        if self.deleted is not None:
            name, self.deleted = self.deleted, None
            self.write(name)
            self.events.append(f"{tick}: re-created {name}")
            return
        present = [n for n in self.fleet if os.path.exists(self.path(n))]
        edit, gone = self.rng.sample(present, 2)
        self.gen[edit] += 1
        self.write(edit)
        os.unlink(self.path(gone))
        self.deleted = gone
        self.events.append(f"{tick}: edited env of {edit} (gen {self.gen[edit]}), deleted {gone}")

    # -- stop and clean up -------------------------------------------------------
    def stop(self, budget: float) -> None:
        assert self.ctl is not None
        before = marked(self.controller_id)
        self.seen |= set(before)
        t0 = time.monotonic()
        self.ctl.send_signal(signal.SIGTERM)
        try:
            rc = self.ctl.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            rc = None
        self.result["stop_s"] = round(time.monotonic() - t0, 2)
        self.result["controller_exit"] = rc
        self.result["live_at_stop"] = len(before)
        # grace for an agent the controller just signalled to finish dying, then the check by pid
        end = time.monotonic() + 3.0
        left = marked(self.controller_id)
        while left and time.monotonic() < end:
            time.sleep(0.1)
            reap(self.seen | set(left))
            left = marked(self.controller_id)
        self.seen |= set(left)
        self.result["leftovers"] = {str(p): i for p, i in sorted(left.items())}
        log(f"SIGTERM -> controller exit {rc} after {self.result['stop_s']}s; "
            f"{len(before)} agents alive before, {len(left)} marked processes left")

    def cleanup(self) -> None:
        if self.ctl is not None and self.ctl.poll() is None:
            try:
                self.ctl.send_signal(signal.SIGTERM)
                self.ctl.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            except OSError:
                pass
            if self.ctl.poll() is None:
                try:
                    os.killpg(self.ctl.pid, signal.SIGKILL)  # the session it leads, by its id
                except OSError:
                    pass
                try:
                    self.ctl.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            self.result.setdefault("controller_exit", "killed in clean-up")
        killed = []
        if self.controller_id:
            for _ in range(20):
                left = marked(self.controller_id)
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except OSError:
                        pass
                self.seen |= set(left)
                time.sleep(0.05)
                reap(left)
        reap(self.seen)
        self.result["killed_in_cleanup"] = sorted(set(killed))
        if self.a.keep:
            log(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- verdict -----------------------------------------------------------------
    def verdict(self, duration: float) -> dict[str, Any]:
        warm = min(30.0, duration / 4)
        post = [s for s in self.samples if s["t"] >= warm and s.get("rss_mib") is not None]
        v: dict[str, Any] = {"warmup_s": warm, "samples_after_warmup": len(post)}
        k = len(post) // 3
        if k < 2:
            v["rss_flat"] = v["fds_flat"] = None
            v["note"] = "too few samples after warm-up for a verdict (run longer)"
        else:
            first, last = post[:k], post[-k:]
            v["window_first_s"] = (first[0]["t"], first[-1]["t"])
            v["window_last_s"] = (last[0]["t"], last[-1]["t"])
            for key in ("rss_mib", "fds", "live", "threads"):
                v[f"{key}_first_median"] = statistics.median(s[key] for s in first)
                v[f"{key}_last_median"] = statistics.median(s[key] for s in last)
            v["fds_minus_live_first_median"] = statistics.median(s["fds"] - s["live"] for s in first)
            v["fds_minus_live_last_median"] = statistics.median(s["fds"] - s["live"] for s in last)
            v["rss_limit"] = round(v["rss_mib_first_median"] * (1 + RSS_TOLERANCE), 2)
            v["fds_limit"] = v["fds_first_median"] + FD_TOLERANCE
            v["rss_flat"] = v["rss_mib_last_median"] <= v["rss_limit"]
            v["fds_flat"] = v["fds_last_median"] <= v["fds_limit"]
            xs = [s["t"] / 60 for s in post]
            ys = [s["rss_mib"] for s in post]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            den = sum((x - mx) ** 2 for x in xs)
            v["rss_slope_mib_per_min"] = round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den, 3) if den else None
        # the log dir, at the end (the controller still running)
        return v

    def log_verdict(self) -> dict[str, Any]:
        d = os.path.join(self.state, "logs")
        total, largest, names = dir_bytes(d)
        n = self.a.agents
        chatty = sum(1 for k in self.fleet.values() if k == "chatty")
        bound = n * MAX_BYTES * (BACKUPS + 1)
        slack = chatty * (BACKUPS + 1) * CHATTY_RATE * 3 + n * 4096
        per_file = MAX_BYTES + CHATTY_RATE * 3
        beyond = sorted(x for x in names if x.rsplit(".", 1)[-1].isdigit() and int(x.rsplit(".", 1)[-1]) > BACKUPS)
        return {"logs_bytes": total, "logs_limit": bound + slack, "largest_file": largest,
                "per_file_limit": per_file, "files": len(names), "beyond_backups": beyond[:10],
                "logs_bounded": total <= bound + slack and not beyond and largest <= per_file}


def render(s: Soak, v: dict[str, Any], lv: dict[str, Any], meta: dict[str, Any]) -> str:
    L = [(f"Soak {meta['started']} on {meta['host']} ({meta['cpus']} CPUs), git {meta['git']}, "
          f"{meta['agentctl_version']}; {s.a.agents} agents ({meta['kinds']}), {s.a.minutes:g} min, "
          f"churn every {2 * SAMPLE_EVERY:g} s; uptime at start: {meta['uptime_start']}; at end: {meta['uptime_end']}"),
         "",
         ("| t s | RSS MiB | fds | threads | CPU s | live agents | zombies | /metrics ms | restarts (api) "
          "| restarts_total (metric) | logs KiB |"),
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x: Any, nd: int = 1) -> str:
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    for x in s.samples:
        L.append(f"| {x['t']:.0f} | {f(x.get('rss_mib'))} | {f(x.get('fds'))} | {f(x.get('threads'))} "
                 f"| {f(x.get('cpu_s'), 2)} | {f(x.get('live'))} | {f(x.get('zombies'))} | {f(x.get('metrics_ms'))} "
                 f"| {f(x.get('restarts_api'))} | {f(x.get('restarts_metric'))} | {f(x.get('logs_kib'))} |")
    L.append("")
    L.append(f"Criterion: after a warm-up of {v['warmup_s']:g} s the {v['samples_after_warmup']} samples are cut in "
             f"thirds; RSS flat if median(last third) <= {1 + RSS_TOLERANCE:.2f} x median(first third); fds flat if "
             f"median(last third) <= median(first third) + {FD_TOLERANCE}; logs bounded if their sum <= agents x "
             f"maxBytes x (backups+1) + slack, no file beyond .{BACKUPS}, and no file over maxBytes + 3 s of the "
             f"fastest writer.")
    L.append("")
    def ok(b: bool | None) -> str:
        return "n/a" if b is None else ("flat" if b else "GROWING")

    if v.get("rss_flat") is not None:
        L.append(f"- RSS: {ok(v['rss_flat'])} - median {v['rss_mib_first_median']:.1f} MiB (t {v['window_first_s'][0]:.0f}-"
                 f"{v['window_first_s'][1]:.0f} s) -> {v['rss_mib_last_median']:.1f} MiB (t {v['window_last_s'][0]:.0f}-"
                 f"{v['window_last_s'][1]:.0f} s), limit {v['rss_limit']:.1f}; least-squares slope after warm-up "
                 f"{f(v['rss_slope_mib_per_min'], 2)} MiB/min")
        L.append(f"- fds: {ok(v['fds_flat'])} - median {v['fds_first_median']:g} -> {v['fds_last_median']:g}, limit "
                 f"{v['fds_limit']:g} (fds minus live agents: {v['fds_minus_live_first_median']:g} -> "
                 f"{v['fds_minus_live_last_median']:g}; live agents {v['live_first_median']:g} -> "
                 f"{v['live_last_median']:g}); threads {v['threads_first_median']:g} -> {v['threads_last_median']:g}")
    else:
        L.append(f"- RSS, fds: no verdict: {v.get('note')}")
    L.append(f"- logs: {'bounded' if lv['logs_bounded'] else 'NOT BOUNDED'} - {lv['logs_bytes'] / 1024:.0f} KiB in "
             f"{lv['files']} files (limit {lv['logs_limit'] / 1024:.0f} KiB), largest file {lv['largest_file'] / 1024:.0f} "
             f"KiB (limit {lv['per_file_limit'] / 1024:.0f} KiB)"
             + (f", files beyond .{BACKUPS}: {lv['beyond_backups']}" if lv["beyond_backups"] else ""))
    r = s.result
    L.append(f"- zombies among the controller's children: max {meta['zombies_max']}, last {meta['zombies_last']}, "
             f"seen in two samples in a row: {len(meta['zombies_stuck'])}; "
             f"instances seen twice at once: max {meta['duplicates_max']}"
             + (f" ({meta['duplicate_instances']})" if meta["duplicate_instances"] else ""))
    L.append(f"- /metrics: p50 {f(meta['metrics_p50'])} ms, max {f(meta['metrics_max'])} ms; restarts over the run "
             f"(metric, monotonic while the agent exists): {meta['restarts_metric_end']}; controller CPU "
             f"{f(meta['cpu_total'], 1)} s over {meta['wall_s']:.0f} s ({f(meta['cpu_pct'], 1)} % of a core); "
             f"phases at the end: {meta['phases_end']}")
    L.append(f"- stop: SIGTERM -> controller exit {r.get('controller_exit')} after {r.get('stop_s')} s "
             f"({r.get('live_at_stop')} agents alive); marked processes left: {len(r.get('leftovers', {}))}"
             + (f" {r['leftovers']} (SIGKILLed by pid: FAILURE)" if r.get("leftovers") else "")
             + f"; controller log: {meta['ctl_log_kib']} KiB, {meta['ctl_log_errors']} ERROR/Traceback lines")
    L.append(f"- **verdict: {'PASS' if meta['pass'] else 'FAIL'}**")
    return "\n".join(L) + "\n"


def git_rev() -> str:
    try:
        r = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                           timeout=10)
        rev = r.stdout.decode().strip()
        d = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "controller"], check=False,
                           capture_output=True, timeout=10)
        return rev + ("+dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True, timeout=5).stdout.decode().strip()
    except (OSError, subprocess.TimeoutExpired):
        with open("/proc/loadavg") as f:
            return "load average: " + " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--crashers", type=float, default=0.3, help="share of crashers")
    p.add_argument("--seed", type=int, default=1, help="seeds the churn's choices")
    p.add_argument("--agentctl", default=os.path.join(REPO, ".venv", "bin", "agentctl"))
    p.add_argument("--keep", action="store_true", help="keep /tmp/agentctl-soak-* (state, logs, controller.log)")
    p.add_argument("--markdown", default=None, help="also write the table and verdict to this file")
    p.add_argument("--json", default=None, help="also write every sample and figure to this file")
    a = p.parse_args(argv)
    if not 4 <= a.agents <= 1000 or not 0 < a.minutes <= 120 or not 0 <= a.crashers <= 1:
        p.error("--agents 4..1000, --minutes (0, 120], --crashers 0..1")
    if not os.access(a.agentctl, os.X_OK):
        p.error(f"{a.agentctl} is not executable (build the repo's .venv, or give --agentctl)")

    duration = a.minutes * 60
    cap = duration + 60
    t_start = time.monotonic()
    hard_deadline = t_start + cap

    def on_alarm(_s: int, _f: FrameType | None) -> None:
        raise HardCap(f"hard time cap of {cap:.0f} s reached")

    def on_signal(signum: int, _f: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.alarm(int(cap) + 1)
    ver = subprocess.run([a.agentctl, "--version"], check=False, capture_output=True, timeout=30)
    meta: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": os.uname().nodename,
                            "cpus": os.cpu_count(), "git": git_rev(), "uptime_start": uptime(),
                            "agentctl_version": (ver.stdout or ver.stderr).decode().strip(),
                            "subreaper": become_subreaper()}
    s = Soak(a)
    kinds: dict[str, int] = {}
    for k in s.fleet.values():
        kinds[k] = kinds.get(k, 0) + 1
    meta["kinds"] = ", ".join(f"{v} {k}s" if k != "liveness" else f"{v} liveness" for k, v in kinds.items())
    log(f"soak in {s.root}: {meta['kinds']}; {a.minutes:g} min; hard cap {cap:.0f} s")
    failure = None
    t0 = None
    try:
        t0 = s.start(deadline=min(hard_deadline - 30, time.monotonic() + 60))
        tick = 0
        while True:
            now = time.monotonic()
            if now - t0 >= duration:
                break
            x = s.sample(now - t0)
            s.samples.append(x)
            log(f"t={x['t']:6.1f}s rss {x.get('rss_mib') or 0:.1f} MiB fds {x.get('fds')} threads {x.get('threads')} "
                f"live {x['live']} zombies {x['zombies']} /metrics {x.get('metrics_ms')} ms "
                f"restarts api {x.get('restarts_api')} metric {x.get('restarts_metric')} logs {x['logs_kib']} KiB")
            if s.ctl is not None and s.ctl.poll() is not None:
                raise RuntimeError(f"controller exited {s.ctl.returncode} during the soak")
            if tick >= 1:  # the first 5 s undisturbed
                s.churn(tick)
            tick += 1
            next_at = t0 + tick * SAMPLE_EVERY
            time.sleep(max(0.0, min(next_at, t0 + duration) - time.monotonic()))
        meta["wall_s"] = time.monotonic() - t0
        meta["cpu_total"] = cpu_seconds(s.ctl.pid) if s.ctl else None
        s.result["log_verdict"] = s.log_verdict()
        s.stop(budget=max(5.0, min(45.0, hard_deadline - time.monotonic() - 10)))
    except (KeyboardInterrupt, HardCap, RuntimeError, OSError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        log(f"aborted: {failure}")
    finally:
        try:
            meta["ctl_log_kib"] = os.path.getsize(os.path.join(s.root, "controller.log")) // 1024
            with open(os.path.join(s.root, "controller.log"), errors="replace") as f:
                meta["ctl_log_errors"] = sum(1 for line in f if " ERROR " in line or "Traceback" in line)
        except OSError:
            meta["ctl_log_kib"] = meta["ctl_log_errors"] = "?"
        signal.alarm(0)
        s.cleanup()
    meta["uptime_end"] = uptime()
    if failure or not s.samples:
        print(f"soak FAILED: {failure or 'no samples'}; killed in clean-up: {s.result.get('killed_in_cleanup')}")
        return 1
    meta.setdefault("wall_s", s.samples[-1]["t"])
    meta["cpu_pct"] = (100.0 * meta["cpu_total"] / meta["wall_s"]) if meta.get("cpu_total") and meta["wall_s"] else None
    ms = [x["metrics_ms"] for x in s.samples if x.get("metrics_ms") is not None]
    meta["metrics_p50"] = statistics.median(ms) if ms else None
    meta["metrics_max"] = max(ms) if ms else None
    meta["zombies_max"] = max(x["zombies"] for x in s.samples)
    meta["zombies_last"] = s.samples[-1]["zombies"]
    # a zombie seen in two samples in a row (5 s apart) is not being reaped
    stuck: set[int] = set()
    for prev, cur in zip(s.samples, s.samples[1:]):
        stuck |= set(prev["zombie_pids"]) & set(cur["zombie_pids"])
    meta["zombies_stuck"] = sorted(stuck)
    meta["duplicates_max"] = max(x["duplicates"] for x in s.samples)
    meta["duplicate_instances"] = sorted({i for x in s.samples for i in x["duplicate_instances"]})[:10]
    meta["restarts_metric_end"] = s.samples[-1].get("restarts_metric")
    meta["phases_end"] = s.samples[-1].get("phases")
    v = s.verdict(meta["wall_s"])
    lv = s.result["log_verdict"]
    r = s.result
    meta["pass"] = bool(v.get("rss_flat") and v.get("fds_flat") and lv["logs_bounded"] and not r.get("leftovers")
                        and not r.get("killed_in_cleanup") and r.get("controller_exit") == 0
                        and not meta["zombies_stuck"] and meta["duplicates_max"] == 0)
    text = render(s, v, lv, meta)
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "verdict": v, "result": r, "samples": s.samples, "churn": s.events}, f,
                      indent=1, default=str)
    return 0 if meta["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
