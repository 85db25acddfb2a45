"""Operator requests through `<state-dir>/requests/` and the suspend override in `overrides.json`.
CLI side (opscommands): is a controller running, send a request and wait for it to be taken.
Controller side (watch.consume_requests, the publish hook): suspend, resume, reconcile.
Never reconciles by itself: it marks agents dirty and lets the loop act."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.status import atomic_write

if TYPE_CHECKING:
    from controller.reconciler import Controller

log = logging.getLogger("agentctl")
SUFFIXES = (".suspend", ".resume", ".reconcile")
OVERRIDES = "overrides.json"


# -- is a controller running on this state dir? ------------------------------------
def lock_held(state_dir: Path) -> bool | None:
    """True/False from controller.lock's flock; None when there is no lock file."""
    try:
        fd = os.open(state_dir / "controller.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _is_agentctl_run(pid: int) -> bool:
    """The pid is alive (not a zombie) and its command line is `agentctl run` / `python -m controller run`."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return False
    named = any(a.endswith("agentctl") or a == "controller" for a in argv)
    return named and "run" in argv


def controller_pid(state_dir: Path) -> int | None:
    try:
        info = json.loads((state_dir / "controller.json").read_text())
        return int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def controller_up(state_dir: Path) -> bool:
    """The lock says it best (it dies with its holder); without one, controller.json's pid."""
    held = lock_held(state_dir)
    if held is not None:
        return held
    pid = controller_pid(state_dir)
    return pid is not None and _is_agentctl_run(pid)


def status_as_of(state_dir: Path) -> str:
    """When the state dir last heard from its controller: the newest status file's write."""
    stamps = [p.stat().st_mtime for p in (state_dir / "status").glob("*.yaml") if p.is_file()]
    for extra in ("state.db", "controller.json"):
        try:
            stamps.append((state_dir / extra).stat().st_mtime)
        except OSError:
            continue
    if not stamps:
        return "unknown"
    return datetime.fromtimestamp(max(stamps), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def live_view(doc: dict[str, Any]) -> dict[str, Any]:
    """With no controller running, a recorded pid may be long dead: count only live ones as ready."""
    out = dict(doc)
    instances = [dict(i) for i in doc.get("instances") or []]
    for inst in instances:
        if inst.get("pid") and not pid_alive(int(inst["pid"])):
            inst["pid"], inst["state"] = None, "exited"
    out["instances"] = instances
    rep = dict(doc.get("replicas") or {})
    if rep:
        rep["ready"] = min(int(rep.get("ready", 0)), sum(1 for i in instances if i.get("pid")))
        out["replicas"] = rep
    return out


# -- the CLI side of a request ----------------------------------------------------
def send(state_dir: Path, stem: str, suffix: str, *, timeout: float = 15.0,
         progress: Callable[[], None] | None = None) -> bool:
    """Drop STEM.SUFFIX into requests/; True once the controller has taken (removed) it."""
    request = state_dir / "requests" / f"{stem}{suffix}"
    atomic_write(request, f"{time.time()}\n")
    deadline = time.monotonic() + timeout
    while request.exists() and time.monotonic() < deadline:
        if progress is not None:
            progress()
        time.sleep(0.02)
    return not request.exists()


def await_ack(state_dir: Path, stem: str, *, timeout: float) -> dict[str, Any] | None:
    """`reconcile --wait`: the controller writes STEM.done once the pass it started is over."""
    done = state_dir / "requests" / f"{stem}.done"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data: dict[str, Any] = json.loads(done.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        done.unlink(missing_ok=True)
        return data
    return None


# -- the controller side ------------------------------------------------------------
def load_suspended(state_dir: Path) -> set[str]:
    try:
        data = json.loads((state_dir / OVERRIDES).read_text())
    except (OSError, ValueError):
        return set()
    return {str(n) for n in data.get("suspended", [])} if isinstance(data, dict) else set()


@dataclass
class OpsState:
    """The operator's overrides, read once at start and written through on each change."""

    state_dir: Path
    suspended: frozenset[str] = frozenset()
    passes: int = 0  # reconcile requests answered since start
    _waiting: tuple[str, ...] = ()  # reconcile requests whose pass is under way

    def __post_init__(self) -> None:
        self.suspended = frozenset(load_suspended(self.state_dir))

    def is_suspended(self, name: str) -> bool:
        return name in self.suspended

    def set_suspended(self, name: str, on: bool) -> bool:
        """Persist before acting, so a crash right after still honours the request. True if it changed."""
        new = self.suspended | {name} if on else self.suspended - {name}
        if new == self.suspended:
            return False
        atomic_write(self.state_dir / OVERRIDES, json.dumps({"suspended": sorted(new)}, indent=1) + "\n")
        self.suspended = frozenset(new)
        return True


def consume(controller: Controller, requests: Path) -> None:
    """suspend/resume/reconcile request files; each is removed once acted on (the CLI waits for that)."""
    for path in sorted(p for p in requests.iterdir() if p.suffix in SUFFIXES):
        if path.suffix == ".reconcile":
            _start_reconcile(controller, path.stem)
        else:
            _suspend(controller, path.stem, path.suffix == ".suspend")
        path.unlink(missing_ok=True)


def _suspend(controller: Controller, name: str, on: bool) -> None:
    if name not in controller.agents:
        log.warning("%s requested for unknown agent %s", "suspend" if on else "resume", name)
        return
    try:
        changed = controller.ops.set_suspended(name, on)
    except OSError as exc:
        log.error("cannot record the operator's %s of %s: %s", "suspend" if on else "resume", name, exc)
        return
    if changed:
        what = "SuspendedByOperator" if on else "ResumedByOperator"
        log.info("%s %s", name, what, extra={"agent": name, "action": "suspend" if on else "resume", "reason": what})
        controller.event(name, None, what, what, f"agentctl {'suspend' if on else 'resume'}")
    controller.mark(name)


def _start_reconcile(controller: Controller, stem: str) -> None:
    import asyncio  # here: the CLI's `get` imports this module and needs no event loop

    log.info("reconcile requested (%s)", stem, extra={"action": "reconcile", "reason": "ReconcileRequested"})
    task = asyncio.get_running_loop().create_task(_reconcile_now(controller, stem))
    controller.background.add(task)
    task.add_done_callback(controller.background.discard)


async def _reconcile_now(controller: Controller, stem: str) -> None:
    """A Git fetch (if any), then a full pass; the ack goes out once that pass is over (after_publish)."""
    import asyncio  # here: the CLI's `get` imports this module and needs no event loop

    git = controller.git
    if git is not None:
        result = await asyncio.to_thread(git.sync)
        if result.changed:
            controller.manifests_changed = True
    controller.ops._waiting += (stem,)
    controller.resync(full=True)  # a full pass, as asked: every agent is reconciled


def after_publish(controller: Controller) -> None:
    """Publish hook: answer the reconcile requests whose pass is done (nothing dirty, nothing running)."""
    import asyncio  # here: the CLI's `get` imports this module and needs no event loop

    ops = controller.ops
    if controller.ready and ops.suspended - set(controller.agents):
        _forget_deleted(controller)
    if not ops._waiting or controller.tasks or controller.dirty or controller.manifests_changed:
        return
    waiting, ops._waiting = ops._waiting, ()
    ops.passes += 1
    task = asyncio.get_running_loop().create_task(_ack(controller, waiting, ops.passes))
    controller.background.add(task)
    task.add_done_callback(controller.background.discard)


async def _ack(controller: Controller, stems: tuple[str, ...], passes: int) -> None:
    """Once the pass's status files are on disk (they are written by a thread), tell the CLI."""
    import asyncio  # here: the CLI's `get` imports this module and needs no event loop

    if controller.status is not None:
        await asyncio.to_thread(controller.status.flush)
    body = json.dumps({"pass": passes, "agents": len(controller.agents), "at": time.time()}) + "\n"
    for stem in stems:
        try:
            atomic_write(controller.state_dir / "requests" / f"{stem}.done", body)
        except OSError as exc:
            log.error("cannot acknowledge reconcile request %s: %s", stem, exc)


def _forget_deleted(controller: Controller) -> None:
    """An override dies with its agent: a manifest added again later starts as written."""
    for name in sorted(controller.ops.suspended - set(controller.agents)):
        try:
            controller.ops.set_suspended(name, False)
        except OSError as exc:
            log.error("cannot drop the operator's suspend of the deleted agent %s: %s", name, exc)
            return
