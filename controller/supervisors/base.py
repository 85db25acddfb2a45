"""The Supervisor protocol: how the reconciler starts, signals and finds instances.

Adapters own every OS effect of running an instance (spawn, signal, liveness of its
processes, cleanup). The reconciler owns timing (grace deadlines, backoff) and never
branches on the adapter kind; the planner never sees an adapter at all.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from controller import cgroups, procfs
from controller.model import Handle, InstanceSpec


class SupervisorError(Exception):
    """An adapter could not do what was asked; `retryable` says whether trying later may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ExitStatus:
    """How the main process ended; both None means unknown (we were not its parent)."""

    code: int | None
    signal: int | None

    @property
    def known(self) -> bool:
        return self.code is not None or self.signal is not None


@dataclass(frozen=True)
class Context:
    """What every adapter is given at construction."""

    state_dir: Path
    controller_id: str  # stable per state dir: names tmux sockets and systemd units


class Supervisor(Protocol):
    kind: ClassVar[str]
    # True when start/stop call external commands: the reconciler runs them off the loop thread.
    blocking: ClassVar[bool]

    def unavailable_reason(self) -> str | None:
        """None when this adapter can run instances on this host, else why not."""

    def start(self, spec: InstanceSpec, log_path: Path) -> Handle:
        """Start the instance; stdout and stderr are appended to log_path. Raises SupervisorError."""

    def signal(self, handle: Handle, sig: int) -> None:
        """Send sig to every process of the instance (its whole process group / unit)."""

    def alive(self, handle: Handle) -> bool:
        """True while any non-zombie process of the instance exists."""

    def adopt(self, handle: Handle) -> bool:
        """After a controller restart: True if handle still names the same live main process."""

    def exit_status(self, handle: Handle) -> ExitStatus:
        """Called once the main process has exited: its exit code or signal if knowable."""

    def cleanup(self, handle: Handle) -> None:
        """Release what the instance left behind once no process of it lives (tmux session...)."""


@runtime_checkable
class Terminal(Protocol):
    """An optional capability: the adapter's instances have a terminal a person can use
    (`agentctl attach` and `capture`). A new adapter that has one implements these two."""

    def attach_argv(self, handle: Handle) -> list[str]:
        """argv that attaches the caller's terminal to the instance's."""

    def capture(self, handle: Handle, raw: bool) -> str:
        """The instance's current screen; raw keeps colour and attribute escapes."""


def signal_group(handle: Handle, sig: int) -> None:
    """sig to the instance's process group, and to its leader if it left that group (setpgid),
    and to every process of its cgroup (setsid escapees included) when it has one."""
    if handle.cgroup:
        cgroups.signal(handle.cgroup, sig)
    try:
        os.killpg(handle.pgid, sig)
    except ProcessLookupError:
        pass
    if handle.pgid != handle.pid and procfs.is_live(handle.pid, handle.start_ticks):
        try:
            os.kill(handle.pid, sig)
        except ProcessLookupError:
            pass


def group_alive(handle: Handle) -> bool:
    """The leader (same start time), any non-zombie member of its group, or (with a cgroup) any
    process of its cgroup still runs: an instance is never reported gone while a process lives."""
    if procfs.is_live(handle.pid, handle.start_ticks) or bool(procfs.live_group_members(handle.pgid)):
        return True
    return bool(handle.cgroup) and bool(cgroups.live_pids(handle.cgroup))


def release_cgroup(handle: Handle) -> None:
    """Once nothing of the instance lives: its cgroup goes (a busy one stays for the sweep)."""
    if handle.cgroup:
        cgroups.remove(handle.cgroup)


def find_executable(argv0: str, *, cwd: str, path: str) -> str | None:
    """Where execvp would find argv0 when run in cwd with PATH=path."""
    candidate = os.path.join(cwd, argv0) if os.sep in argv0 else argv0
    return shutil.which(candidate, path=path)


def run_id(spec: InstanceSpec) -> str:
    """AGENTCTL_RUN, set by the reconciler for each start; names the run's cgroup."""
    return dict(spec.env).get("AGENTCTL_RUN", "") or os.urandom(6).hex()


def joined(handle: Handle) -> Handle:
    """The handle as it really is: a cgroup the main process did not get into is not claimed."""
    if handle.cgroup and not cgroups.contains(handle.cgroup, handle.pid) \
            and procfs.is_live(handle.pid, handle.start_ticks):
        cgroups.remove(handle.cgroup)
        return Handle(handle.pid, handle.pgid, handle.start_ticks, handle.unit)
    return handle


class CachedCheck:
    """An availability check that runs a command: asked on every reconcile, run every `ttl` seconds."""

    def __init__(self, check: Callable[[], str | None], ttl: float = 30.0) -> None:
        self.check = check
        self.ttl = ttl
        self._last: tuple[float, str | None] | None = None

    def __call__(self) -> str | None:
        now = time.monotonic()
        if self._last is None or now - self._last[0] > self.ttl:
            self._last = (now, self.check())
        return self._last[1]
