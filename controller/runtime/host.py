"""The host seam: what the runtime asks the operating system about processes it did not start
in this life (recovery after a crash, the orphan sweep) and about the machine (boot id).

Effects layer. `ProcHost` reads /proc; the deterministic simulation passes a fake world.
"""

from __future__ import annotations

import os
import signal
from typing import Protocol

from controller import cgroups, procfs


class Host(Protocol):
    def boot_id(self) -> str:
        """Changes on every boot: a pid recorded before a reboot names nobody of ours."""

    def marked(self, controller_id: str) -> list[procfs.Marked]:
        """Live processes carrying this controller's marker env (AGENTCTL_CONTROLLER_ID)."""

    def marker_of(self, pid: int) -> tuple[str, str] | None:
        """(AGENTCTL_INSTANCE, AGENTCTL_CONTROLLER_ID) of a process; None when unreadable or gone."""

    def cmdline(self, pid: int) -> tuple[str, ...] | None:
        """The argv a process runs."""

    def descends_from(self, pid: int, ancestor: int) -> bool:
        """True when ancestor is pid's parent, grandparent, ..."""

    def in_tmux_pane(self, marked: procfs.Marked) -> bool:
        """A tmux pane's command: its session is the tmux adapter's to find."""

    def kill(self, pid: int) -> None:
        """SIGKILL to one process (a leftover no instance owns)."""

    def prune_cgroups(self, controller_id: str, *, keep: set[str], starting: set[str]) -> None:
        """Remove the empty instance cgroups of runs that are over."""


class ProcHost:
    def boot_id(self) -> str:
        return procfs.boot_id()

    def marked(self, controller_id: str) -> list[procfs.Marked]:
        return procfs.marked_processes(controller_id)

    def marker_of(self, pid: int) -> tuple[str, str] | None:
        env = procfs.read_environ(pid)
        if not env:
            return None
        return env.get("AGENTCTL_INSTANCE", ""), env.get("AGENTCTL_CONTROLLER_ID", "")

    def cmdline(self, pid: int) -> tuple[str, ...] | None:
        return procfs.cmdline(pid)

    def descends_from(self, pid: int, ancestor: int) -> bool:
        return procfs.descends_from(pid, ancestor)

    def in_tmux_pane(self, marked: procfs.Marked) -> bool:
        return procfs.parent_is_tmux(marked.stat)

    def kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def prune_cgroups(self, controller_id: str, *, keep: set[str], starting: set[str]) -> None:
        cgroups.prune(controller_id, keep=keep, starting=starting)
