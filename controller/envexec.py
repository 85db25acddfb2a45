"""The exec wrapper in front of an instance's command: env from a 0600 file, its cgroup, exec.

The tmux and systemd adapters start `python3 -I -S envexec.py [--env-file F] [--cgroup D] -- ARGV`
so that no env value is ever on a command line (CONTRACT §11); they also use `write_env_file` and
`command` from here. Runs as a script with only os and sys: it must print no value it read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

EXEC_FAILED = 127  # as a shell reports "command not found"
ENV_FAILED = 126


def encode_env(env: Mapping[str, str]) -> bytes:
    """KEY=VALUE\\0 records, like /proc/PID/environ: any value round-trips, no quoting rules."""
    return b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0" for k, v in env.items())


def decode_env(raw: bytes) -> dict[str, str]:
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[os.fsdecode(key)] = os.fsdecode(value)
    return env


def write_env_file(directory: str, name: str, env: Mapping[str, str]) -> str:
    """A fresh 0600 file (in a 0700 dir) that only the wrapper reads, then unlinks."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{name}.{os.urandom(6).hex()}.env")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, encode_env(env))
    finally:
        os.close(fd)
    return path


def remove_stale(directory: str, *, older_than: float = 600.0) -> None:
    """Env files no wrapper ever read (its pane or unit died before it ran): unlinked later."""
    import time

    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".env") and time.time() - os.stat(path).st_mtime > older_than:
                os.unlink(path)
        except OSError:
            continue


def command(argv: Sequence[str], *, env_file: str | None = None, cgroup: str | None = None) -> list[str]:
    """The wrapper's own argv: interpreter and file paths, never a value of the env."""
    out = [sys.executable, "-I", "-S", os.path.abspath(__file__)]
    if env_file is not None:
        out += ["--env-file", env_file]
    if cgroup is not None:
        out += ["--cgroup", cgroup]
    return [*out, "--", *argv]


def is_wrapper(cmdline: Sequence[str] | None) -> bool:
    """Is this process still the wrapper (not yet exec'd into the instance's command)?"""
    return bool(cmdline) and os.path.abspath(__file__) in list(cmdline or ())[:4]


def parse_args(args: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
    env_file = cgroup = None
    rest = list(args)
    while rest and rest[0] != "--":
        flag = rest.pop(0)
        if flag not in ("--env-file", "--cgroup") or not rest:
            raise SystemExit(f"agentctl envexec: bad argument {flag!r}")
        if flag == "--env-file":
            env_file = rest.pop(0)
        else:
            cgroup = rest.pop(0)
    if not rest[1:]:
        raise SystemExit("agentctl envexec: no command after --")
    return env_file, cgroup, rest[1:]


def load_env(path: str) -> dict[str, str]:
    """Read once and unlink: the values live on only in this process's memory and its exec."""
    with open(path, "rb") as fh:
        raw = fh.read()
    os.unlink(path)
    return decode_env(raw)


def join_cgroup(directory: str) -> None:
    """'0' moves the writing process itself; done before exec, so nothing forked escapes it."""
    with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as fh:
        fh.write("0")


def main(args: Sequence[str]) -> int:
    env_file, cgroup, argv = parse_args(args)
    env = dict(os.environ)
    if env_file is not None:
        try:
            env.update(load_env(env_file))
        except OSError as exc:  # never run the command without the env it was given
            sys.stderr.write(f"agentctl: cannot read the instance env file {env_file}: {exc.strerror or exc}\n")
            return ENV_FAILED
    if cgroup is not None:
        try:
            join_cgroup(cgroup)
        except OSError as exc:
            # the controller sees the process outside its cgroup and tracks it by process group
            sys.stderr.write(f"agentctl: cannot join cgroup {cgroup}: {exc.strerror or exc}\n")
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        sys.stderr.write(f"agentctl: cannot execute {argv[0]!r}: {exc.strerror or exc}\n")
    return EXEC_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
