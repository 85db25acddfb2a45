"""The `process` adapter: each instance is a direct child, leader of its own process group,
in its own cgroup where the host allows one (else tracked by process group and marker env):
a lone start is born in it (clone3, supervisors/clonespawn.py); a start in a burst, or where clone3
cannot be used, joins it through a /bin/sh trampoline before it execs argv.

argv is exec'd without a shell; env is given to execve, never on a command line; output is
appended to the instance log. Exit codes are known for children of this controller; an
adopted process's exit code is not (reason Lost).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from typing import ClassVar

from controller import cgroups, procfs
from controller.model import Handle, InstanceSpec
from controller.supervisors import clonespawn
from controller.supervisors.base import (
    Context,
    ExitStatus,
    SupervisorError,
    find_executable,
    group_alive,
    release_cgroup,
    run_id,
    signal_group,
)


# A start this soon after the previous one is part of a burst (a cold start, a resync): the loop's
# time then goes to the next start, so the child joins its cgroup through the trampoline, which
# costs the loop 0.3 ms and moves the child in parallel; a lone start (a crash, a new manifest) is
# born in its cgroup, which costs the loop about 2 ms (the copy of a 50 MiB process) and the
# child no 10-15 ms migration.
BURST_GAP = 0.05
_FINAL_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
                           errno.ENAMETOOLONG, errno.E2BIG, errno.EPERM})


def spawn_env(spec: InstanceSpec) -> dict[str, str]:
    """The controller's own environment under the instance's explicit env."""
    env = dict(os.environ)
    env.update(spec.env)
    return env


def open_log(log_path: Path) -> int:
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def plain_exec_format(path: str) -> bool:
    """An ELF binary or a #! script: what execve runs itself. Anything else (no #!, or a
    binfmt_misc format) is left to a direct execve, never to the trampoline's shell."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(b"#!") or head == b"\x7fELF"


def start_error(spec: InstanceSpec, exc: OSError | ValueError) -> SupervisorError:
    """No such program, not executable, no cwd: trying again cannot help; out of processes or file
    descriptors (EAGAIN, EMFILE, ENOMEM) may pass."""
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    final = not isinstance(exc, OSError) or exc.errno in _FINAL_ERRNOS
    return SupervisorError(f"cannot start {spec.argv[0]!r}: {message}", retryable=not final)


class BornChild:
    """What the adapter keeps of a child started by clone3: Popen's poll/wait, by pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self._wait(os.WNOHANG)

    def wait(self) -> int:
        code = self._wait(0)
        assert code is not None
        return code

    def _wait(self, flags: int) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            self.returncode = 0  # reaped elsewhere: as Popen reports it
            return 0
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class ProcessSupervisor:
    kind: ClassVar[str] = "process"
    blocking: ClassVar[bool] = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cgroups = cgroups.Cgroups(ctx.controller_id)
        self._children: dict[int, subprocess.Popen[bytes] | BornChild] = {}
        self.clone = clonespawn.CloneSpawner()
        self.burst_gap = BURST_GAP
        self._last_start = float("-inf")
        self._devnull: int | None = None  # one fd for every child's stdin, not an open() per spawn

    def unavailable_reason(self) -> str | None:
        return None

    def start(self, spec: InstanceSpec, log_path: Path) -> Handle:
        cgroup = self.cgroups.create(spec.id, run_id(spec), spec.spec_hash)
        env = spawn_env(spec)
        argv = list(spec.argv)
        if cgroup is not None:
            # neither clone3 nor the trampoline would report a missing command as such: check it here
            exe = find_executable(spec.argv[0], cwd=spec.cwd, path=env.get("PATH", os.defpath))
            if exe is None:
                cgroups.remove(cgroup)
                raise SupervisorError(f"cannot start {spec.argv[0]!r}: not found or not executable", retryable=False)
            if self.clone.usable() and self._lone_start():
                pid = self._born_in(spec, exe, env, cgroup, log_path)
                if pid is not None:
                    return self._handle(pid, str(cgroup))
            if plain_exec_format(exe):
                argv = cgroups.join_argv(cgroup, spec.argv)
            else:  # a shell would run it as a script: exec it directly, as before, and track its group
                cgroups.remove(cgroup)
                cgroup = None
        fd = open_log(log_path)
        try:
            child = subprocess.Popen(  # noqa: S603 - argv, never a shell (the trampoline only execs "$@")
                argv,
                cwd=spec.cwd,
                env=env,
                stdin=self._stdin(),
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte or a bad env name slipped through
            if cgroup is not None:
                cgroups.remove(cgroup)
            raise start_error(spec, exc) from exc
        finally:
            os.close(fd)
        self._children[child.pid] = child
        return self._handle(child.pid, str(cgroup or ""))

    def _lone_start(self) -> bool:
        now = time.monotonic()
        lone = now - self._last_start >= self.burst_gap
        self._last_start = now
        return lone

    def _born_in(self, spec: InstanceSpec, exe: str, env: dict[str, str], cgroup: Path, log_path: Path) -> int | None:
        """Start the child inside its cgroup (no move, no shell); None: use the trampoline instead."""
        fd = open_log(log_path)
        try:
            pid = self.clone.spawn(exe, spec.argv, env=env, cwd=spec.cwd, cgroup=str(cgroup),
                                   stdin=self._stdin(), stdout=fd)
        except clonespawn.MechanismError as exc:
            self.clone.disable(str(exc))
            return None
        except (OSError, ValueError) as exc:
            cgroups.remove(cgroup)
            raise start_error(spec, exc) from exc
        finally:
            os.close(fd)
        self._children[pid] = BornChild(pid)
        return pid

    def _handle(self, pid: int, cgroup: str) -> Handle:
        ticks = procfs.start_ticks(pid)
        if ticks is None:  # exited and was reaped already: cannot happen before wait(), keep a sane value
            ticks = 0
        return Handle(pid=pid, pgid=pid, start_ticks=ticks, cgroup=cgroup)

    def _stdin(self) -> int:
        if self._devnull is None:
            self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        return self._devnull

    def signal(self, handle: Handle, sig: int) -> None:
        signal_group(handle, sig)

    def alive(self, handle: Handle) -> bool:
        self._reap(handle.pid)
        return group_alive(handle)

    def adopt(self, handle: Handle) -> bool:
        return procfs.is_live(handle.pid, handle.start_ticks)

    def exit_status(self, handle: Handle) -> ExitStatus:
        child = self._children.pop(handle.pid, None)
        if child is None:
            return ExitStatus(None, None)
        code = child.wait()
        if code < 0:
            return ExitStatus(None, -code)
        return ExitStatus(code, None)

    def cleanup(self, handle: Handle) -> None:
        self._reap(handle.pid)
        release_cgroup(handle)

    def _reap(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None and child.returncode is None:
            child.poll()
