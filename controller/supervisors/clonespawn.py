"""Starting a `process` instance inside its own cgroup from its first instruction: clone3 with
CLONE_INTO_CGROUP, then exec. Being born in the cgroup costs nothing; moving a process into one
(a write to cgroup.procs, what the /bin/sh trampoline does) waits for an RCU grace period in the
kernel, 10-15 ms of every start.

Effects layer, used by the process adapter only, which falls back to the trampoline whenever this
is unavailable (another architecture, no clone3, a seccomp filter) or fails as a mechanism. The
child runs nothing but a few pre-built ctypes calls (dup2, setsid, chdir, close_range, signal
dispositions, execve): every argument is built before the clone, nothing is allocated after it.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # CPython's C module under signal.py: ints, no enums
import ctypes
import errno
import gc
import logging
import os
import platform
import select
import signal as signals
import struct
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger("agentctl.spawn")

SYS_CLONE3 = 435  # the same number on x86_64 and arm64 (the generic syscall table)
SYS_CLOSE_RANGE = 436
CLONE_INTO_CGROUP = 0x200000000
CLOSE_RANGE_CLOEXEC = 1 << 2
SIG_SETMASK = 2
SIG_BLOCK = 0
# the child is a copy of a threaded interpreter: should it ever wedge before exec (a lock held by
# a thread that does not exist in the copy), it is killed after this long and the trampoline used
EXEC_TIMEOUT = 2.0
# which step of the child failed: failures of chdir and execve belong to the command (ENOENT,
# EACCES...), the others to this mechanism
STEP_FDS, STEP_SESSION, STEP_CWD, STEP_CLOSE, STEP_EXEC = 1, 2, 3, 4, 5
SUPPORTED_MACHINES = ("x86_64", "aarch64", "arm64")
# While a child is made, no other thread may ask for the GIL: the copy would see the request and,
# alone in its process, wait forever for a thread that does not exist to take the GIL. A thread
# asks only after waiting a whole switch interval; this one outlasts the clone (microseconds) by
# far, and is short enough that a thread that began to wait inside it is not starved for long.
HOLD_GIL_INTERVAL = 0.2


class CloneArgs(ctypes.Structure):
    """struct clone_args, as far as CLONE_INTO_CGROUP (version 2, 88 bytes)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
        "set_tid", "set_tid_size", "cgroup")]


class MechanismError(Exception):
    """clone3 cannot be used here (or failed for a reason of its own): start another way."""


class CommandError(OSError):
    """The command itself cannot be started (no cwd, no program, not executable): as Popen says."""


def c_strings(items: Sequence[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def encode_env(env: Mapping[str, str]) -> list[bytes]:
    """KEY=VALUE byte strings, refused as Popen refuses them (a C string cannot carry a NUL)."""
    out = []
    for key, value in env.items():
        k, v = os.fsencode(key), os.fsencode(value)
        if b"=" in k or not k:
            raise ValueError("illegal environment variable name")
        out.append(k + b"=" + v)
    return [checked(item) for item in out]


def checked(raw: bytes) -> bytes:
    if b"\0" in raw:
        raise ValueError("embedded null byte")
    return raw


class _Libc:
    """libc entry points through PyDLL: the GIL is held across each call, so no other thread of
    ours runs between the clone and the child's exec, and the child inherits a consistent GIL."""

    def __init__(self) -> None:
        lib = ctypes.PyDLL(None, use_errno=True)
        self.syscall = lib.syscall
        self.syscall.restype = ctypes.c_long
        self.dup2, self.setsid, self.chdir, self.execve = lib.dup2, lib.setsid, lib.chdir, lib.execve
        self.write, self.exit = lib.write, lib._exit
        self.sigmask = lib.pthread_sigmask
        self.signal = lib.signal
        self.signal.restype = ctypes.c_void_p
        self.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]


# every signal but the two that cannot be caught, as ints: the enum conversions of
# signal.valid_signals() and signal.getsignal() cost 100 us per start, this 3 us
_CATCHABLE = tuple(int(s) for s in signals.valid_signals() if s not in (signals.SIGKILL, signals.SIGSTOP))
_RESTORED = (int(signals.SIGPIPE), int(signals.SIGXFSZ))


def handled_signals() -> tuple[int, ...]:
    """Signals whose disposition the child must reset before it unblocks signals: those with a
    Python handler (its C part would write to the parent's wake-up pipe) and those Python ignores
    at start (SIGPIPE, SIGXFSZ: Popen restores them too). Other ignored signals stay ignored, as
    with Popen (a controller run under nohup passes that on)."""
    get = _signal.getsignal
    return tuple(s for s in _CATCHABLE if s in _RESTORED or callable(get(s)))


class CloneSpawner:
    """One per process adapter; `problem` says why it is not used (then: the trampoline)."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self._libc: _Libc | None = None
        if platform.machine() not in SUPPORTED_MACHINES:
            self.problem = f"clone3 not wired for {platform.machine()}"

    def usable(self) -> bool:
        return self.problem is None

    def disable(self, why: str) -> None:
        if self.problem is None:
            log.warning("starting in the cgroup with clone3 failed (%s): using the join trampoline", why)
        self.problem = why

    def spawn(self, path: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: str, cgroup: str,
              stdin: int, stdout: int) -> int:
        """The child's pid, running argv in cgroup; CommandError, ValueError, or MechanismError."""
        if min(stdin, stdout) < 3:
            raise MechanismError("stdin or log fd below 3")  # dup2 onto itself would not clear CLOEXEC
        if self._libc is None:
            self._libc = _Libc()
        c_path = checked(os.fsencode(os.path.abspath(path)))
        c_argv = c_strings([checked(os.fsencode(a)) for a in argv])
        c_env = c_strings(encode_env(env))
        c_cwd = checked(os.fsencode(cwd))
        dirfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return self._clone(self._libc, c_path, c_argv, c_env, c_cwd, dirfd, stdin, stdout)
        finally:
            os.close(dirfd)

    def _clone(self, libc: _Libc, c_path: bytes, c_argv: ctypes.Array[ctypes.c_char_p],
               c_env: ctypes.Array[ctypes.c_char_p], c_cwd: bytes, dirfd: int, stdin: int, stdout: int) -> int:
        rd, wr = os.pipe2(os.O_CLOEXEC)
        args = CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=int(signals.SIGCHLD), cgroup=dirfd)
        block_all = (ctypes.c_ulong * 16)(*([(1 << 64) - 1] * 16))
        old_mask = (ctypes.c_ulong * 16)()
        reset = handled_signals()
        max_fd = ctypes.c_uint(0xFFFFFFFF)
        report = ctypes.create_string_buffer(8)
        interval, collecting = sys.getswitchinterval(), gc.isenabled()
        os.sched_yield()  # gives the GIL up and takes it again: taking it clears a pending request
        sys.setswitchinterval(HOLD_GIL_INTERVAL)  # and none comes before the clone, microseconds later
        gc.disable()  # no finalizer of the parent's objects may run in the copy (a buffer flushed twice)
        try:
            libc.sigmask(SIG_BLOCK, block_all, old_mask)  # no signal handler may run in the copy
            pid = libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.sizeof(args))
            if pid == 0:  # the child: pre-built arguments only, then exec or _exit
                try:
                    _child(libc, c_path, c_argv, c_env, c_cwd, stdin, stdout, reset, old_mask, max_fd, report, wr)
                finally:  # whatever happened, the copy never returns into the controller's code
                    libc.exit(127)
            err = ctypes.get_errno()
            libc.sigmask(SIG_SETMASK, old_mask, None)
        finally:
            sys.setswitchinterval(interval)
            if collecting:
                gc.enable()
        os.close(wr)
        try:
            if pid < 0 and err in (errno.EAGAIN, errno.ENOMEM):
                raise OSError(err, os.strerror(err))  # out of processes or memory: retried, as with Popen
            if pid < 0:
                raise MechanismError(f"clone3: {os.strerror(err)}")
            return self._await_exec(pid, rd)
        finally:
            os.close(rd)

    def _await_exec(self, pid: int, rd: int) -> int:
        """EOF on the pipe: the child exec'd (the pipe is close-on-exec). 8 bytes: a step failed."""
        poller = select.poll()  # not select(): with thousands of agents this fd is above 1024
        poller.register(rd, select.POLLIN)
        if not poller.poll(EXEC_TIMEOUT * 1000):
            os.kill(pid, signals.SIGKILL)  # our own child, wedged before its exec
            os.waitpid(pid, 0)
            raise MechanismError(f"the child did not exec within {EXEC_TIMEOUT:g}s")
        raw = os.read(rd, 8)
        if not raw:
            return pid
        os.waitpid(pid, 0)  # it has _exit'ed: no zombie left behind
        step, err = struct.unpack("ii", raw.ljust(8, b"\0"))
        if step in (STEP_CWD, STEP_EXEC):
            raise CommandError(err, os.strerror(err))
        raise MechanismError(f"child step {step}: {os.strerror(err) if err else 'failed'}")


def _child(libc: _Libc, c_path: bytes, c_argv: ctypes.Array[ctypes.c_char_p], c_env: ctypes.Array[ctypes.c_char_p],
           c_cwd: bytes, stdin: int, stdout: int, reset: tuple[int, ...], old_mask: ctypes.Array[ctypes.c_ulong],
           max_fd: ctypes.c_uint, report: ctypes.Array[ctypes.c_char], wr: int) -> None:
    """Runs in the copy between clone3 and execve; never returns."""
    step = STEP_FDS
    if libc.dup2(stdin, 0) >= 0 and libc.dup2(stdout, 1) >= 0 and libc.dup2(stdout, 2) >= 0:
        step = STEP_SESSION
        if libc.setsid() >= 0:  # leader of its own session and process group, as start_new_session
            step = STEP_CWD
            if libc.chdir(c_cwd) == 0:
                step = STEP_CLOSE
                # every fd above 2 closes at exec (close_fds=True); the report pipe with them
                if libc.syscall(SYS_CLOSE_RANGE, 3, max_fd, CLOSE_RANGE_CLOEXEC) == 0:
                    for sig in reset:
                        libc.signal(sig, None)  # SIG_DFL
                    libc.sigmask(SIG_SETMASK, old_mask, None)
                    step = STEP_EXEC
                    libc.execve(c_path, c_argv, c_env)
    struct.pack_into("ii", report, 0, step, ctypes.get_errno() or errno.EINVAL)
    libc.write(wr, report, 8)
    libc.exit(127)
