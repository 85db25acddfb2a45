"""The `systemd` adapter: each instance is a transient service of the user's systemd manager.

Builds `systemd-run --user` / `systemctl --user` command lines (pure functions, unit-tested
on recorded output) and runs them. The unit keeps its exit status until `cleanup`; timing
(grace periods, SIGKILL) stays with the reconciler, which stops through `systemctl kill`.
The unit is its own cgroup (systemd's); the env reaches it through the env wrapper's 0600
file, never through `--setenv` on a command line.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal as signals
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from controller import envexec, procfs
from controller.model import Handle, InstanceSpec
from controller.supervisors.base import CachedCheck, Context, ExitStatus, SupervisorError
from controller.supervisors.process import open_log, spawn_env

SYSTEMD_RUN = "systemd-run"
SYSTEMCTL = "systemctl"
COMMAND_TIMEOUT = 30.0
CACHE_SECONDS = 30.0
EXIT_WAIT = 1.0  # how long exit_status waits for the manager to record the exit
UNIT_NAME_MAX = 255
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUN_DIR = "run"  # under the 0700 state dir: the env wrapper's one-shot env files
SHOW_PROPERTIES = (
    "LoadState", "ActiveState", "SubState", "MainPID", "ExecMainPID", "ExecMainCode", "ExecMainStatus",
    "ControlGroup",
)  # fmt: skip
# ExecMainCode is a siginfo si_code: CLD_EXITED -> exit status, CLD_KILLED/CLD_DUMPED -> signal.
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3
BUSY_STATES = frozenset({"activating", "deactivating", "reloading"})
# systemd refuses other names (e.g. bash's exported `BASH_FUNC_f%%`): they are left out.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ESCAPE_KEEP = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


@dataclass(frozen=True)
class UnitState:
    """What `systemctl show` says about a unit; pids are 0 when there is none."""

    load: str
    active: str
    sub: str
    main_pid: int
    exec_pid: int
    exit: ExitStatus
    cgroup: str

    @property
    def loaded(self) -> bool:
        return self.load not in ("", "not-found")


# -- pure: names and command lines ------------------------------------------------------


def escape_name(text: str) -> str:
    """`systemd-escape TEXT`: '/' -> '-', a leading '.' and every byte outside [A-Za-z0-9:_.] -> \\xNN."""
    out = []
    for index, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif char in ESCAPE_KEEP and not (char == "." and index == 0):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def unit_name(controller_id: str, instance_id: str) -> str:
    name = f"agentctl-{escape_name(controller_id)}-{escape_name(instance_id)}.service"
    if len(name) <= UNIT_NAME_MAX:
        return name
    digest = hashlib.sha256(f"{controller_id}\0{instance_id}".encode()).hexdigest()[:32]
    return f"agentctl-{digest}.service"


def escape_exec_arg(arg: str) -> str:
    """systemd expands $VAR and ${VAR} in a service's arguments; '$$' is a literal '$'."""
    return arg.replace("$", "$$")


def run_argv(unit: str, *, argv: Sequence[str], cwd: str, env_file: str, log_path: Path) -> list[str]:
    """The systemd-run call that starts an instance.

    Type=exec: systemd-run fails when the command cannot be executed. RemainAfterExit=yes keeps
    the unit (and ExecMainCode/Status) loaded after the exit; a successful transient unit would
    otherwise be unloaded at once, taking its exit status with it, which is why there is no
    --collect: `cleanup` stops and resets the unit instead. No TimeoutStopSec/SendSIGKILL: the
    reconciler stops with `systemctl kill` and its own grace period, never `systemctl stop`.
    The env is never on this command line (no --setenv): the env wrapper reads it from
    `env_file` (0600) and execs argv, so ExecMainPID is the command's own pid.
    """
    log = str(log_path)
    wrapped = envexec.command(argv, env_file=env_file)
    return [
        SYSTEMD_RUN, "--user", "--quiet", "--unit", unit, "--service-type=exec",
        "-p", "KillMode=control-group", "-p", "RemainAfterExit=yes",
        "-p", f"StandardOutput=append:{log}", "-p", f"StandardError=append:{log}",
        "--working-directory", cwd,
        "--", wrapped[0], *(escape_exec_arg(arg) for arg in wrapped[1:]),
    ]  # fmt: skip


def unit_env(env: Mapping[str, str]) -> dict[str, str]:
    """systemd refuses some names (e.g. bash's exported `BASH_FUNC_f%%`): they are left out, as before."""
    return {key: value for key, value in env.items() if ENV_NAME.fullmatch(key)}


def show_argv(unit: str) -> list[str]:
    return [SYSTEMCTL, "--user", "show", "--property=" + ",".join(SHOW_PROPERTIES), "--", unit]


def signal_name(sig: int) -> str:
    try:
        return signals.Signals(sig).name
    except ValueError:
        return str(sig)


def kill_argv(unit: str, sig: int) -> list[str]:
    return [SYSTEMCTL, "--user", "kill", f"--signal={signal_name(sig)}", "--kill-whom=all", "--", unit]


def stop_argv(unit: str) -> list[str]:
    return [SYSTEMCTL, "--user", "stop", "--", unit]


def reset_failed_argv(unit: str) -> list[str]:
    return [SYSTEMCTL, "--user", "reset-failed", "--", unit]


# -- pure: parsing `systemctl show` -------------------------------------------------------


def parse_show(text: str) -> dict[str, str]:
    """KEY=VALUE lines -> dict (a value may itself hold '=')."""
    props = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return props


def to_int(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def exit_from(code: int, status: int) -> ExitStatus:
    if code == CLD_EXITED:
        return ExitStatus(status, None)
    if code in (CLD_KILLED, CLD_DUMPED):
        return ExitStatus(None, status)
    return ExitStatus(None, None)


def parse_unit_state(text: str) -> UnitState:
    props = parse_show(text)
    return UnitState(
        load=props.get("LoadState", ""),
        active=props.get("ActiveState", ""),
        sub=props.get("SubState", ""),
        main_pid=to_int(props.get("MainPID")),
        exec_pid=to_int(props.get("ExecMainPID")),
        exit=exit_from(to_int(props.get("ExecMainCode")), to_int(props.get("ExecMainStatus"))),
        cgroup=props.get("ControlGroup", ""),
    )


def unit_busy(state: UnitState) -> bool:
    """Still running or changing state; 'active (exited)' is RemainAfterExit after the exit."""
    return state.active in BUSY_STATES or (state.active == "active" and state.sub != "exited")


def resolve_argv0(argv0: str, *, cwd: str, path: str) -> str | None:
    """Absolute path of the executable, looked up as execvp would from cwd with PATH=path."""
    candidate = os.path.join(cwd, argv0) if os.sep in argv0 else argv0
    found = shutil.which(candidate, path=path)
    return os.path.abspath(found) if found else None


# -- effects --------------------------------------------------------------------------


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run one command (argv, never a shell) in our environment, which locates the user bus.

    Never raises: a missing binary or a timeout come back as a failed call.
    """
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, -1, "", str(exc))


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def read_unit(unit: str) -> UnitState | None:
    proc = run(show_argv(unit))
    return parse_unit_state(proc.stdout) if proc.returncode == 0 else None


def cgroup_has_live_process(cgroup: str) -> bool:
    """Any non-zombie process left in the unit's cgroup (cgroup v2 layout)."""
    if not cgroup:
        return False
    try:
        text = (CGROUP_ROOT / cgroup.lstrip("/") / "cgroup.procs").read_text()
    except OSError:
        return False
    for pid in map(int, text.split()):
        stat = procfs.read_stat(pid)
        if stat is not None and stat.state not in ("Z", "X"):
            return True
    return False


def systemd_problem() -> str | None:
    for tool in (SYSTEMD_RUN, SYSTEMCTL):
        if shutil.which(tool) is None:
            return f"{tool} not found in PATH"
    argv = [SYSTEMCTL, "--user", "show-environment"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemctl --user show-environment failed: {exc}"
    if proc.returncode != 0:
        detail = first_line(proc.stderr) or f"exit code {proc.returncode}"
        return f"no systemd user manager: systemctl --user show-environment failed: {detail}"
    return None


class SystemdSupervisor:
    kind: ClassVar[str] = "systemd"
    blocking: ClassVar[bool] = True

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.unavailable_reason = CachedCheck(systemd_problem, CACHE_SECONDS)

    def start(self, spec: InstanceSpec, log_path: Path) -> Handle:
        env = spawn_env(spec)
        cwd = os.path.abspath(spec.cwd)
        executable = checked_executable(spec, cwd=cwd, env=env)
        os.close(open_log(log_path))  # created 0600; the manager opens it with O_APPEND
        unit = unit_name(self.ctx.controller_id, spec.id)
        self._discard(unit)
        argv = (executable, *spec.argv[1:])
        log = Path(os.path.abspath(log_path))  # systemd wants an absolute, normalized path
        run_dir = str(self.ctx.state_dir / RUN_DIR)
        envexec.remove_stale(run_dir)
        env_file = envexec.write_env_file(run_dir, unit, unit_env(env))  # the wrapper unlinks it
        proc = run(run_argv(unit, argv=argv, cwd=cwd, env_file=env_file, log_path=log))
        if proc.returncode != 0:
            _unlink(env_file)
            raise SupervisorError(f"systemd-run {unit} failed: {first_line(proc.stderr) or proc.returncode}")
        state = read_unit(unit)
        if state is None or state.exec_pid == 0:
            raise SupervisorError(f"systemd started {unit} but reports no main pid")
        ticks = procfs.start_ticks(state.exec_pid)
        # systemd runs every service in its own session: pgid == pid
        return Handle(pid=state.exec_pid, pgid=state.exec_pid, start_ticks=ticks or 0, unit=unit)

    def signal(self, handle: Handle, sig: int) -> None:
        proc = run(kill_argv(handle.unit, sig))
        if proc.returncode == 0:
            return
        # unit already gone or the manager unreachable: the process group is still ours to signal
        try:
            os.killpg(handle.pgid, sig)
        except ProcessLookupError:
            pass

    def alive(self, handle: Handle) -> bool:
        if procfs.is_live(handle.pid, handle.start_ticks) or procfs.live_group_members(handle.pgid):
            return True
        state = read_unit(handle.unit)
        if state is None or state.exec_pid != handle.pid:
            return False
        return unit_busy(state) or cgroup_has_live_process(state.cgroup)

    def adopt(self, handle: Handle) -> bool:
        state = read_unit(handle.unit)
        if state is None or state.main_pid != handle.pid:
            return False
        return procfs.is_live(handle.pid, handle.start_ticks)

    def exit_status(self, handle: Handle) -> ExitStatus:
        """The manager records ExecMainCode a moment after the pidfd reports the exit."""
        deadline = time.monotonic() + EXIT_WAIT
        while True:
            state = read_unit(handle.unit)
            if state is None or state.exec_pid != handle.pid:
                return ExitStatus(None, None)
            if state.exit.known or time.monotonic() >= deadline:
                return state.exit
            time.sleep(0.02)

    def cleanup(self, handle: Handle) -> None:
        state = read_unit(handle.unit)
        if state is not None and state.exec_pid in (0, handle.pid):  # never a newer instance's unit
            self._release(handle.unit)

    def _discard(self, unit: str) -> None:
        """A unit left under this instance's name is a stale copy of it: end it first."""
        state = read_unit(unit)
        if state is None or not state.loaded:
            return
        if unit_busy(state) or cgroup_has_live_process(state.cgroup):
            run(kill_argv(unit, signals.SIGKILL))
        self._release(unit)

    def _release(self, unit: str) -> None:
        run(stop_argv(unit))  # errors ignored: the unit may be gone already
        run(reset_failed_argv(unit))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def checked_executable(spec: InstanceSpec, *, cwd: str, env: Mapping[str, str]) -> str:
    if not os.path.isdir(cwd):
        raise SupervisorError(f"cannot start {spec.argv[0]!r}: no directory {cwd!r}", retryable=False)
    found = resolve_argv0(spec.argv[0], cwd=cwd, path=env.get("PATH", os.defpath))
    if found is None:
        raise SupervisorError(f"cannot start {spec.argv[0]!r}: not found or not executable", retryable=False)
    return found
