"""The fence process: kills this host's coordinated instances once the lease deadline passes.

Started by `agentctl run` as `python -m controller.fleet.fence`, so it acts while the controller
is hung (SIGSTOP, a blocked call) or dead. It has no etcd client and no event loop: it reads the
small file the controller rewrites on every lease renewal (fence.json: deadline on the shared
CLOCK_MONOTONIC, and the pid/pgid/start time of every instance) and kills by process group.
It exits once its controller is gone and nothing it guards is left alive, or when a successor
controller has taken the file over (that controller's own fence guards from then on).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

POLL = 0.05  # seconds: the fence acts at most this late after the deadline


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int, start_ticks: int | None = None) -> bool:
    """Alive, not a zombie, and (when given) the same process that started at start_ticks."""
    fields = _stat(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def read_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marked(controller_id: str) -> list[int]:
    """Coordinated processes of this controller found by their env marker: also those started
    after the controller last wrote the file, and descendants that left the group."""
    if not controller_id:
        return []
    needle = f"AGENTCTL_CONTROLLER_ID={controller_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if needle in env and any(e.startswith(b"AGENTCTL_FENCING_TOKEN=") for e in env):
            found.append(int(name))
    return found


def kill(state: dict[str, Any], *, scan: bool) -> int:
    """SIGKILL every guarded group (and marked process); the number of signals sent."""
    sent = 0
    for target in state.get("targets") or []:
        pid, pgid, ticks = (int(x) for x in target)
        if group_alive(pgid) and (alive(pid, ticks) or not alive(pid)):
            # the group still has members: the pid cannot have been reused while its group lives
            try:
                os.killpg(pgid, signal.SIGKILL)
                sent += 1
            except (ProcessLookupError, PermissionError):
                pass
    for pid in marked(str(state.get("controllerId") or "")) if scan else []:
        for fn, arg in ((os.killpg, _pgid(pid)), (os.kill, pid)):
            try:
                if arg > 0:
                    fn(arg, signal.SIGKILL)
                    sent += 1
            except (ProcessLookupError, PermissionError):
                pass
    return sent


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return 0


def guarded_alive(state: dict[str, Any]) -> bool:
    return any(group_alive(int(t[1])) for t in state.get("targets") or [])


def say(message: str) -> None:
    try:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}Z fence[{os.getpid()}] {message}",
              file=sys.stderr, flush=True)
    except OSError:
        pass  # the controller's stderr may be gone with it


def run(path: str, controller: int, controller_ticks: int | None) -> int:
    fenced_at: float | None = None  # the deadline we last acted on
    last_scan = 0.0
    state: dict[str, Any] = {}
    while True:
        state = read_state(path) or state
        now = time.monotonic()
        owner = int(state.get("controller") or controller)
        if owner != controller and alive(owner):
            return 0  # a successor controller runs with its own fence
        deadline = float(state.get("deadline") or 0.0)
        if state and now >= deadline:
            scan = fenced_at != deadline or now - last_scan > 1.0
            sent = kill(state, scan=scan)
            if scan:
                last_scan = now
            if fenced_at != deadline or sent:
                say(f"lease deadline passed: killed {sent} process groups of the coordinated instances")
            fenced_at = deadline
        if not alive(controller, controller_ticks) and (now >= deadline or not guarded_alive(state)):
            return 0
        time.sleep(POLL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agentctl-fence")
    p.add_argument("--file", required=True)
    p.add_argument("--controller-pid", type=int, required=True)
    p.add_argument("--controller-start", type=int, default=None)
    args = p.parse_args(argv)
    # a Ctrl-C or stop of the controller must not take the guard with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return run(args.file, args.controller_pid, args.controller_start)


if __name__ == "__main__":
    sys.exit(main())
