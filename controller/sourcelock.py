"""One controller per manifests source on this host: an flock'd file named by the source's hash.

Effects layer, called by cli.cmd_run before the controller starts. The lock lives in a private
dir (/run/agentctl for root, else /tmp/agentctl-<uid>; also $XDG_RUNTIME_DIR/agentctl if set),
never in the manifests dir, which nothing ever writes to. It holds the holder's pid and state
dir so a refused second controller can name it. It must not know anything of reconciling.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path


class SourceLocked(Exception):
    """Another controller on this host serves the same manifests: refuse to run them twice."""


@dataclass(frozen=True)
class SourceLock:
    held: tuple[tuple[Path, int], ...]  # (lock file, its open fd)

    def release(self) -> None:
        """Unlink while still locked, then close: a waiter that opened the old file sees it is gone."""
        for path, fd in self.held:
            if _same_file(path, fd):
                path.unlink(missing_ok=True)
            os.close(fd)  # closing drops the flock


def lock_dirs() -> list[Path]:
    """The fixed directory of this user, and the session's runtime dir too when one is set: a
    controller started from a login shell and one started by cron or a unit (no XDG_RUNTIME_DIR)
    must see each other, so each lock is taken in both."""
    fixed = Path("/run/agentctl") if os.geteuid() == 0 else Path(f"/tmp/agentctl-{os.geteuid()}")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return [fixed] if not runtime or Path(runtime) / "agentctl" == fixed else [Path(runtime) / "agentctl", fixed]


@dataclass(frozen=True)
class SourceKey:
    shown: str  # what the refusal names: the directory, or the Git URL and path
    key: str  # what is hashed into the lock file's name


def source_keys(manifests: Path | None, git: tuple[str, str] | None, *, host: str = "") -> list[SourceKey]:
    """What identifies a source. A directory counts under its path as given (after a symlink swap
    it is still the same source) and under its real path (another symlink to it is too). The
    placement host name is part of the key: controllers that act as different hosts of a fleet
    (--host-name) place different agents, so they may share a machine and a source."""
    suffix = f" for host {host}" if host else ""
    if git is not None:
        url, path = git
        shown = f"{url} path {path.strip('/') or '/'}{suffix}"
        return [SourceKey(shown, f"{host}\0git:{url}#{path.strip('/')}")]
    assert manifests is not None
    given, real = os.path.abspath(manifests), os.path.realpath(manifests)
    return [SourceKey(d + suffix, f"{host}\0dir:{d}") for d in dict.fromkeys((given, real))]


def acquire(keys: list[SourceKey], *, state_dir: Path, directory: Path | None = None) -> SourceLock:
    """Lock every key in every lock directory, or none; SourceLocked names the controller that holds one."""
    held: list[tuple[Path, int]] = []
    try:
        for where in [directory] if directory is not None else lock_dirs():
            _private_dir(where)
            _sweep_stale(where)
            for key in keys:
                held.append(_lock_one(where, key, state_dir))
    except BaseException:
        SourceLock(tuple(held)).release()
        raise
    return SourceLock(tuple(held))


def _private_dir(where: Path) -> None:
    """Ours alone: a directory another user owns or can write to could fake or steal the lock."""
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(where)
    except OSError as exc:
        raise SourceLocked(f"cannot use the lock directory {where}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise SourceLocked(f"lock directory {where} is not a directory owned by uid {os.geteuid()}: refusing it")
    if st.st_mode & 0o077:
        raise SourceLocked(f"lock directory {where} is open to other users (mode {stat.S_IMODE(st.st_mode):o}):"
                           " refusing it")


def _sweep_stale(where: Path, limit: int = 200) -> None:
    """Lock files of controllers that were killed (no release ran): whoever can lock one may
    remove it, since a file nobody holds locks nothing. Bounded per start."""
    for path in sorted(where.glob("*.lock"))[:limit]:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, or not a regular file of ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live controller's lock
        if _same_file(path, fd):
            path.unlink(missing_ok=True)  # under the lock: a waiter on this file sees it is gone and retries
        os.close(fd)


def _lock_one(where: Path, key: SourceKey, state_dir: Path) -> tuple[Path, int]:
    path = where / (hashlib.sha256(key.key.encode()).hexdigest()[:32] + ".lock")
    for _ in range(10):  # bounded: each retry means a holder released (and unlinked) just now
        fd = _locked_fd(path, key)
        if _same_file(path, fd):
            break
        os.close(fd)  # we locked a file its holder unlinked on release: lock the new one
    else:
        raise SourceLocked(f"cannot take the lock {path}: it keeps being replaced")
    os.ftruncate(fd, 0)
    info = {"pid": os.getpid(), "stateDir": str(state_dir.resolve()), "source": key.shown}
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return path, fd


def _locked_fd(path: Path, key: SourceKey) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise SourceLocked(f"{key.shown} is already served by another controller on this host"
                           f" ({holder}); refusing to run its agents twice") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode(errors="replace"))
        return f"pid {int(info['pid'])}, state dir {info['stateDir']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown: it is still starting"
