"""The `tmux` adapter: each instance runs in its own session of a private tmux server.

The server socket is `<state-dir>/tmux.sock` (or `-L agentctl-<controller id>` when that
path is too long for a socket). Output reaches the instance log from the first byte, and
the dead pane is kept until `cleanup` so its exit status can be read. Also gives the CLI
`attach_argv` and `capture`; it never decides when to start or stop anything.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal as signals
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from controller import cgroups, envexec, procfs
from controller.model import Handle, InstanceSpec
from controller.supervisors.base import (
    CachedCheck,
    Context,
    ExitStatus,
    SupervisorError,
    find_executable,
    group_alive,
    joined,
    release_cgroup,
    run_id,
    signal_group,
)
from controller.supervisors.process import open_log

TMUX = "tmux"
SOCKET_FILE = "tmux.sock"
RUN_DIR = "run"  # under the 0700 state dir: the wrappers' one-shot env files
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; keep a margin
WINDOW_SIZE = ("200", "50")
COMMAND_TIMEOUT = 10.0
EXIT_WAIT = 2.0  # how long exit_status waits for tmux to record the exit status (slow on a loaded host)
EXEC_WAIT = 5.0  # how long start waits for the pane's child to exec the command
CACHE_SECONDS = 30.0
MIN_VERSION = (3, 0)  # respawn-pane -e
HOLD_ARGV = ("cat", "-")  # placeholder process of a new pane until pipe-pane is attached
PANE_FORMAT = "#{session_name}|#{pane_pid}|#{pane_dead}|#{pane_dead_status}|#{pane_dead_signal}"
# tmux sets these for the pane; the instance gets them from tmux unless its manifest sets them.
TERMINAL_VARS = frozenset({"TERM", "TERM_PROGRAM", "TERM_PROGRAM_VERSION", "COLORTERM", "TMUX"})
# The tmux client runs with only these (plus PATH); whichever client starts the server fixes
# its global environment, so keeping it small keeps stale variables out of the panes.
CLIENT_VARS = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMUX_TMPDIR")


@dataclass(frozen=True)
class PaneState:
    """One line of `list-panes -F PANE_FORMAT`."""

    session: str
    pid: int
    dead: bool
    status: int | None
    signal: int | None


# -- pure: names, escaping, command construction, parsing ------------------------------


def session_name(instance_id: str) -> str:
    """tmux forbids '.' and ':' in session names; keep a conservative alphabet."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", instance_id) or "_"


def socket_args(ctx: Context) -> list[str]:
    path = ctx.state_dir.absolute() / SOCKET_FILE
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return ["-S", str(path)]
    return ["-L", "agentctl-" + session_name(ctx.controller_id)]


def tmux_argv(ctx: Context, args: Sequence[str]) -> list[str]:
    """-f /dev/null: a user's ~/.tmux.conf must not change how our server behaves."""
    return [TMUX, *socket_args(ctx), "-f", "/dev/null", *args]


def pane_target(session: str) -> str:
    """Exact session name ('=': no prefix match), its current window and pane."""
    return f"={session}:"


def escape_arg(arg: str) -> str:
    """tmux splits commands at an argument ending in ';'; a '\\;' ending is kept as ';'."""
    return arg[:-1] + "\\;" if arg.endswith(";") else arg


def escape_format(text: str) -> str:
    """For arguments tmux expands as formats (-c, the pipe-pane command)."""
    return text.replace("#", "##")


def command_line(commands: Iterable[Sequence[str]]) -> list[str]:
    """Several tmux commands as one argv, joined by ';' separators."""
    out: list[str] = []
    for cmd in commands:
        if out:
            out.append(";")
        out.extend(escape_arg(arg) for arg in cmd)
    return out


def create_commands(session: str, *, log_path: Path) -> list[list[str]]:
    """A session whose pane holds a placeholder, keeps its dead pane, and pipes to the log."""
    target = pane_target(session)
    pipe = "cat >> " + escape_format(shlex.quote(str(log_path)))
    width, height = WINDOW_SIZE
    return [
        ["new-session", "-d", "-s", session, "-x", width, "-y", height, "--", *HOLD_ARGV],
        ["set-option", "-w", "-t", target, "remain-on-exit", "on"],
        ["pipe-pane", "-t", target, pipe],
    ]


def pane_env(spec: InstanceSpec) -> dict[str, str]:
    """What the wrapper puts over the pane's environment: the instance's env over ours, minus
    the terminal variables we inherited (tmux sets those for the pane; the manifest may override)."""
    env = {key: value for key, value in os.environ.items() if key not in TERMINAL_VARS}
    env.update(spec.env)
    return env


def respawn_command(session: str, spec: InstanceSpec, pane_argv: Sequence[str]) -> list[str]:
    """Replace the placeholder by the real command: output is piped from its first byte. The
    argv is the env wrapper's (several words: tmux runs it without a shell), holding no env value."""
    return ["respawn-pane", "-k", "-t", pane_target(session), "-c", escape_format(spec.cwd), "--", *pane_argv]


def list_panes_command(session: str) -> list[str]:
    return ["list-panes", "-t", pane_target(session), "-F", PANE_FORMAT]


def parse_pane(line: str) -> PaneState | None:
    """'name|4242|1|3|' -> PaneState; tmux leaves status or signal empty when not known."""
    parts = line.strip().split("|")
    if len(parts) != 5 or not parts[1].isdigit():
        return None
    name, pid, dead, status, sig = parts
    return PaneState(
        session=name,
        pid=int(pid),
        dead=dead == "1",
        status=int(status) if status.isdigit() else None,
        signal=int(sig) if sig.isdigit() and sig != "0" else None,
    )


def pane_exit(pane: PaneState | None) -> ExitStatus:
    if pane is None or not pane.dead:
        return ExitStatus(None, None)
    if pane.signal is not None:
        return ExitStatus(None, pane.signal)
    return ExitStatus(pane.status, None)


def parse_version(text: str) -> tuple[int, int] | None:
    """'tmux 3.3a' -> (3, 3); 'tmux next-3.5' -> (3, 5); None if there is no number."""
    match = re.search(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def client_env(path: str | None = None) -> dict[str, str]:
    """Environment of the tmux client; the pane's PATH is the client's PATH (tmux rule)."""
    env = {key: os.environ[key] for key in CLIENT_VARS if key in os.environ}
    env["PATH"] = path if path is not None else os.environ.get("PATH", os.defpath)
    return env


# -- effects: running tmux ------------------------------------------------------------


def run_tmux(
    ctx: Context, commands: Sequence[Sequence[str]], *, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    """One tmux client call (argv, never a shell) running `commands` in order on the server.

    Never raises: a missing binary or a hung server come back as a failed call.
    """
    argv = tmux_argv(ctx, command_line(commands))
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, env=client_env(path), timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, -1, "", str(exc))


def checked(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        raise SupervisorError(f"tmux {what} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def read_pane(ctx: Context, session: str) -> PaneState | None:
    """The session's pane, or None when the session (or the whole server) is gone."""
    proc = run_tmux(ctx, [list_panes_command(session)])
    if proc.returncode != 0:
        return None
    lines = proc.stdout.splitlines()
    pane = parse_pane(lines[0]) if lines else None
    return pane if pane is not None and pane.session == session else None


def kill_session(ctx: Context, session: str) -> None:
    run_tmux(ctx, [["kill-session", "-t", "=" + session]])  # already gone is fine


def attach_argv(ctx: Context, handle: Handle) -> list[str]:
    """argv that attaches a terminal to the instance's session (detach: C-b d).

    Run it with TMUX removed from the environment when the caller is itself inside tmux.
    """
    return [TMUX, *socket_args(ctx), "attach-session", "-t", "=" + handle.unit]


def capture(ctx: Context, handle: Handle, raw: bool) -> str:
    """The visible screen of the instance's pane; raw keeps colour and attribute escapes."""
    args = ["capture-pane", "-p", "-t", pane_target(handle.unit)] + (["-e"] if raw else [])
    text = checked(run_tmux(ctx, [args]), f"capture-pane of session {handle.unit!r}")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return "".join(line + "\n" for line in lines)


def keep_last_screen(ctx: Context, handle: Handle) -> None:
    """The dead pane's last screen (with colours) into logs/<session>.screen, before the session goes."""
    from controller.screens import last_screen_path, save_last_screen  # activity: last-screen snapshot

    try:
        save_last_screen(last_screen_path(ctx.state_dir, handle.unit), capture(ctx, handle, True))
    except (SupervisorError, OSError):
        pass  # no screen to keep (session already gone, disk full): the log still has the output


class TmuxSupervisor:
    kind: ClassVar[str] = "tmux"
    blocking: ClassVar[bool] = True

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.unavailable_reason = CachedCheck(tmux_problem, CACHE_SECONDS)
        self.cgroups = cgroups.Cgroups(ctx.controller_id)

    # -- the Terminal capability (agentctl attach, capture) ---------------------
    def attach_argv(self, handle: Handle) -> list[str]:
        return attach_argv(self.ctx, handle)

    def capture(self, handle: Handle, raw: bool) -> str:
        return capture(self.ctx, handle, raw)

    def start(self, spec: InstanceSpec, log_path: Path) -> Handle:
        spec = replace(spec, cwd=os.path.abspath(spec.cwd))
        env = pane_env(spec)
        check_runnable(spec, env)
        os.close(open_log(log_path))  # created 0600 before `cat >>` appends to it
        self.ctx.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        session = session_name(spec.id)
        self._discard(session)
        cgroup = self.cgroups.create(spec.id, run_id(spec), spec.spec_hash)
        # the env goes through a 0600 file the wrapper reads and unlinks: never on a command line
        run_dir = str(self.ctx.state_dir / RUN_DIR)
        envexec.remove_stale(run_dir)
        env_file = envexec.write_env_file(run_dir, session, env)
        argv = envexec.command(spec.argv, env_file=env_file, cgroup=str(cgroup) if cgroup else None)
        try:
            pane = self._spawn(session, spec, argv, log_path, path=env.get("PATH", os.defpath))
        except SupervisorError:
            kill_session(self.ctx, session)
            _unlink(env_file)
            if cgroup is not None:
                cgroups.remove(cgroup)
            raise
        _wait_for_exec(pane.pid)
        ticks = procfs.start_ticks(pane.pid)
        # the pane process is a session leader (forkpty): its pgid is its pid
        return joined(Handle(pid=pane.pid, pgid=pane.pid, start_ticks=ticks or 0, unit=session,
                             cgroup=str(cgroup or "")))

    def signal(self, handle: Handle, sig: int) -> None:
        signal_group(handle, sig)

    def alive(self, handle: Handle) -> bool:
        return group_alive(handle)

    def adopt(self, handle: Handle) -> bool:
        pane = read_pane(self.ctx, handle.unit)
        if pane is None or pane.dead or pane.pid != handle.pid:
            return False
        return procfs.is_live(handle.pid, handle.start_ticks)

    def exit_status(self, handle: Handle) -> ExitStatus:
        """tmux reaps the pane process and marks the pane dead a moment after the exit."""
        deadline = time.monotonic() + EXIT_WAIT
        while True:
            pane = read_pane(self.ctx, handle.unit)
            if pane is None or pane.pid != handle.pid:
                return ExitStatus(None, None)
            # tmux may mark the pane dead (pty closed) a moment before it has the exit status
            known = pane.dead and (pane.status is not None or pane.signal is not None)
            if known:
                return pane_exit(pane)
            # Debian's tmux links libutempter, which sets SIGCHLD to SIG_DFL while its helper runs
            # (tmux/tmux#311): a SIGCHLD landing then is lost, and the pane's process stays an
            # unreaped zombie, whose wait status the kernel still shows
            zombie = procfs.zombie_status(handle.pid, handle.start_ticks) if pane.dead else None
            if zombie is not None:
                return ExitStatus(*zombie)
            if time.monotonic() >= deadline:
                return pane_exit(pane)
            time.sleep(0.01)

    def cleanup(self, handle: Handle) -> None:
        pane = read_pane(self.ctx, handle.unit)
        if pane is not None and pane.pid == handle.pid:  # never a newer instance's session
            keep_last_screen(self.ctx, handle)  # activity: `capture` of an exited instance shows it
            kill_session(self.ctx, handle.unit)
        release_cgroup(handle)

    def _spawn(self, session: str, spec: InstanceSpec, argv: list[str], log_path: Path, *, path: str) -> PaneState:
        create = create_commands(session, log_path=Path(os.path.abspath(log_path)))
        checked(run_tmux(self.ctx, create), f"new-session {session!r}")
        respawn = [respawn_command(session, spec, argv), list_panes_command(session)]
        out = checked(run_tmux(self.ctx, respawn, path=path), f"respawn-pane {session!r}")
        pane = parse_pane(out.splitlines()[-1]) if out.strip() else None
        if pane is None:
            raise SupervisorError(f"tmux gave no pane pid for session {session!r}: {out!r}")
        return pane

    def _discard(self, session: str) -> None:
        """A session left under this instance's name is a stale copy of it: end it first."""
        pane = read_pane(self.ctx, session)
        if pane is None:
            return
        if not pane.dead:
            try:
                os.killpg(pane.pid, signals.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        kill_session(self.ctx, session)


def _wait_for_exec(pid: int) -> None:
    """tmux reports the pane pid at fork: until the child exec's, it is still a copy of tmux, and
    then the env wrapper until that has joined the cgroup, read its env file and exec'd."""
    deadline = time.monotonic() + EXEC_WAIT
    while time.monotonic() < deadline:
        argv = procfs.cmdline(pid)
        if not argv or (os.path.basename(argv[0]) != os.path.basename(TMUX) and not envexec.is_wrapper(argv)):
            return
        time.sleep(0.002)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def check_runnable(spec: InstanceSpec, env: Mapping[str, str]) -> None:
    """tmux would fall back to $HOME for a missing cwd and show a failed exec only as exit 1."""
    if not os.path.isdir(spec.cwd):
        raise SupervisorError(f"cannot start {spec.argv[0]!r}: no directory {spec.cwd!r}", retryable=False)
    if find_executable(spec.argv[0], cwd=spec.cwd, path=env.get("PATH", os.defpath)) is None:
        raise SupervisorError(f"cannot start {spec.argv[0]!r}: not found or not executable", retryable=False)


def tmux_problem() -> str | None:
    if shutil.which(TMUX) is None:
        return "tmux not found in PATH"
    try:
        proc = subprocess.run(
            [TMUX, "-V"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"tmux -V failed: {exc}"
    version = parse_version(proc.stdout)
    if proc.returncode != 0:
        return f"tmux -V failed: {proc.stderr.strip() or proc.returncode}"
    if version is not None and version < MIN_VERSION:
        return f"{proc.stdout.strip()} is too old (need tmux >= {MIN_VERSION[0]}.{MIN_VERSION[1]})"
    return None
