"""systemd adapter: unit names, systemd-run/systemctl command lines, `systemctl show` parsing.

The samples are `systemctl --user show --property=...` output as systemd 252 prints it
(properties in systemd's own order, numeric ExecMainCode).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from controller import envexec, procfs
from controller.model import Handle, InstanceSpec
from controller.supervisors import systemd
from controller.supervisors.base import Context, ExitStatus, Supervisor, SupervisorError

UNIT = "agentctl-c1-reviewer\\x2d0.service"
CGROUP = f"/user.slice/user-1000.slice/user@1000.service/app.slice/{UNIT}"

RUNNING = f"""MainPID=4242
ExecMainPID=4242
ExecMainCode=0
ExecMainStatus=0
ControlGroup={CGROUP}
LoadState=loaded
ActiveState=active
SubState=running
"""

EXITED_3 = f"""MainPID=0
ExecMainPID=4242
ExecMainCode=1
ExecMainStatus=3
ControlGroup={CGROUP}
LoadState=loaded
ActiveState=failed
SubState=failed
"""

KILLED_TERM = """MainPID=0
ExecMainPID=4242
ExecMainCode=2
ExecMainStatus=15
ControlGroup=
LoadState=loaded
ActiveState=failed
SubState=failed
"""

DUMPED_SEGV = KILLED_TERM.replace("ExecMainCode=2", "ExecMainCode=3").replace("ExecMainStatus=15", "ExecMainStatus=11")

# RemainAfterExit=yes after exit code 0: the unit stays "active (exited)" until cleanup
EXITED_OK = f"""MainPID=0
ExecMainPID=4242
ExecMainCode=1
ExecMainStatus=0
ControlGroup={CGROUP}
LoadState=loaded
ActiveState=active
SubState=exited
"""

STOPPING = RUNNING.replace("ActiveState=active", "ActiveState=deactivating").replace("SubState=running", "SubState=stop-sigterm")

NOT_FOUND = """MainPID=0
ExecMainPID=0
ExecMainCode=0
ExecMainStatus=0
ControlGroup=
LoadState=not-found
ActiveState=inactive
SubState=dead
"""


def test_adapter_satisfies_the_supervisor_protocol() -> None:
    adapter: Supervisor = systemd.SystemdSupervisor(Context(Path("/tmp/s"), "c1"))
    assert adapter.kind == "systemd" and adapter.blocking


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("reviewer-0", "reviewer\\x2d0"),
        ("a.b", "a.b"),
        (".hidden", "\\x2ehidden"),
        ("a/b", "a-b"),
        ("A:b_c", "A:b_c"),
        ("ü x", "\\xc3\\xbc\\x20x"),
        ("a\\b", "a\\x5cb"),
        ("", ""),
    ],
)
def test_escape_name_follows_systemd_escape(text: str, expected: str) -> None:
    assert systemd.escape_name(text) == expected


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape is not installed")
@pytest.mark.parametrize("text", ["reviewer-0", ".x.y", "a/b/c", "ü x-1", "tab\there", "-lead", "99:_."])
def test_escape_name_agrees_with_the_real_systemd_escape(text: str) -> None:
    real = subprocess.run(["systemd-escape", "--", text], capture_output=True, text=True, check=True, timeout=10)
    assert systemd.escape_name(text) == real.stdout.strip()


def test_unit_name_escapes_both_parts() -> None:
    assert systemd.unit_name("c1", "reviewer-0") == UNIT


def test_overlong_unit_name_is_hashed_to_a_stable_short_one() -> None:
    name = systemd.unit_name("c" * 300, "reviewer-0")
    assert name.startswith("agentctl-") and name.endswith(".service")
    assert len(name) <= systemd.UNIT_NAME_MAX
    assert name == systemd.unit_name("c" * 300, "reviewer-0")
    assert name != systemd.unit_name("c" * 300, "reviewer-1")


def test_run_argv_starts_a_transient_service_that_keeps_its_exit_status() -> None:
    argv = systemd.run_argv(
        UNIT,
        argv=("/usr/bin/python3", "-c", "print('$HOME')", "${X}"),
        cwd="/srv/work dir",
        env_file="/state/run/u.ab.env",
        log_path=Path("/state/logs/reviewer-0.log"),
    )
    wrapper = envexec.command(["/usr/bin/python3"], env_file="/state/run/u.ab.env")[:-1]
    assert argv == [
        "systemd-run", "--user", "--quiet", "--unit", UNIT, "--service-type=exec",
        "-p", "KillMode=control-group", "-p", "RemainAfterExit=yes",
        "-p", "StandardOutput=append:/state/logs/reviewer-0.log",
        "-p", "StandardError=append:/state/logs/reviewer-0.log",
        "--working-directory", "/srv/work dir",
        "--", *wrapper, "/usr/bin/python3", "-c", "print('$$HOME')", "$${X}",
    ]  # fmt: skip
    assert "--collect" not in argv
    assert not any(arg.startswith("--setenv") for arg in argv)


def test_unit_env_leaves_out_names_systemd_refuses() -> None:
    assert systemd.unit_env({"B": "2 3", "A": "x=y", "BASH_FUNC_f%%": "() { :; }"}) == {"B": "2 3", "A": "x=y"}


def test_dollar_is_doubled_so_systemd_does_not_expand_it() -> None:
    assert systemd.escape_exec_arg("$A ${B} $$") == "$$A $${B} $$$$"


def test_show_argv_asks_for_every_property_the_adapter_reads() -> None:
    assert systemd.show_argv(UNIT) == [
        "systemctl", "--user", "show",
        "--property=LoadState,ActiveState,SubState,MainPID,ExecMainPID,ExecMainCode,ExecMainStatus,ControlGroup",
        "--", UNIT,
    ]  # fmt: skip


def test_kill_argv_signals_every_process_of_the_unit_by_name() -> None:
    assert systemd.kill_argv(UNIT, signal.SIGTERM) == [
        "systemctl", "--user", "kill", "--signal=SIGTERM", "--kill-whom=all", "--", UNIT,
    ]  # fmt: skip
    assert systemd.kill_argv(UNIT, 9)[3] == "--signal=SIGKILL"


def test_signal_without_a_name_is_given_as_its_number() -> None:
    assert systemd.signal_name(200) == "200"


def test_cleanup_commands() -> None:
    assert systemd.stop_argv(UNIT) == ["systemctl", "--user", "stop", "--", UNIT]
    assert systemd.reset_failed_argv(UNIT) == ["systemctl", "--user", "reset-failed", "--", UNIT]


def test_parse_show_keeps_equals_signs_in_values() -> None:
    assert systemd.parse_show("A=b=c\nnoise\nD=\n") == {"A": "b=c", "D": ""}


def test_running_unit() -> None:
    state = systemd.parse_unit_state(RUNNING)
    assert (state.main_pid, state.exec_pid, state.cgroup) == (4242, 4242, CGROUP)
    assert state.exit == ExitStatus(None, None)
    assert state.loaded and systemd.unit_busy(state)


def test_exit_code_of_a_failed_unit() -> None:
    state = systemd.parse_unit_state(EXITED_3)
    assert state.exit == ExitStatus(3, None)
    assert state.main_pid == 0 and not systemd.unit_busy(state)


def test_killed_and_dumped_units_report_the_signal() -> None:
    assert systemd.parse_unit_state(KILLED_TERM).exit == ExitStatus(None, 15)
    assert systemd.parse_unit_state(DUMPED_SEGV).exit == ExitStatus(None, 11)


def test_successful_exit_kept_by_remain_after_exit_is_not_busy() -> None:
    state = systemd.parse_unit_state(EXITED_OK)
    assert state.exit == ExitStatus(0, None)
    assert state.active == "active" and not systemd.unit_busy(state)


def test_deactivating_unit_is_busy() -> None:
    assert systemd.unit_busy(systemd.parse_unit_state(STOPPING))


def test_unknown_unit() -> None:
    state = systemd.parse_unit_state(NOT_FOUND)
    assert not state.loaded
    assert state.exit == ExitStatus(None, None)
    assert (state.main_pid, state.exec_pid) == (0, 0)


def test_empty_output_parses_to_nothing_known() -> None:
    state = systemd.parse_unit_state("")
    assert not state.loaded and state.exit == ExitStatus(None, None)


def test_resolve_argv0(tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "agent"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert systemd.resolve_argv0("agent", cwd="/", path=str(tool.parent)) == str(tool)
    assert systemd.resolve_argv0("./bin/agent", cwd=str(tmp_path), path="") == str(tool)
    assert systemd.resolve_argv0("missing", cwd="/", path=str(tool.parent)) is None


# -- the adapter's calls, with systemctl/systemd-run replaced by recorded answers ------


class FakeSystemd:
    """Answers each command from a queue of (stdout, returncode) per verb; records every argv."""

    def __init__(self, answers: dict[str, list[tuple[str, int]]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        verb = "run" if argv[0] == "systemd-run" else argv[2]
        queue = self.answers.get(verb, [])
        out, code = queue.pop(0) if len(queue) > 1 else (queue[0] if queue else ("", 0))
        return subprocess.CompletedProcess(argv, code, out, "Failed: boom\nmore" if code else "")

    def verbs(self) -> list[str]:
        return ["run" if c[0] == "systemd-run" else c[2] for c in self.calls]


NO_PID = 4_000_000  # above pid_max: never a live process


def fake(monkeypatch: pytest.MonkeyPatch, **answers: list[tuple[str, int]]) -> FakeSystemd:
    runner = FakeSystemd(answers)
    monkeypatch.setattr(systemd, "run", runner)
    return runner


def adapter() -> systemd.SystemdSupervisor:
    return systemd.SystemdSupervisor(Context(Path("/tmp/s"), "c1"))


def spec_for(tmp_path: Path) -> InstanceSpec:
    return InstanceSpec("reviewer-0", "reviewer", 0, "systemd", ("sh", "-c", "exit 0"), (("K", "v"),), str(tmp_path), "h")


def test_start_runs_the_unit_and_returns_its_main_pid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    me = os.getpid()  # a live pid, so start ticks can be read
    runner = fake(monkeypatch, show=[(NOT_FOUND, 0), (RUNNING.replace("4242", str(me)), 0)], run=[("", 0)])
    handle = adapter().start(spec_for(tmp_path), tmp_path / "logs" / "r.log")
    assert handle == Handle(pid=me, pgid=me, start_ticks=procfs.start_ticks(me) or -1, unit=UNIT)
    assert runner.verbs() == ["show", "run", "show"]
    run_call = runner.calls[1]
    assert run_call[-3:] == [shutil.which("sh"), "-c", "exit 0"]
    assert not any("K=v" in arg for arg in run_call)  # the env is in the wrapper's 0600 file
    env_file = Path(run_call[run_call.index("--env-file") + 1])
    assert env_file.parent == Path("/tmp/s/run") and (env_file.stat().st_mode & 0o777) == 0o600
    assert envexec.decode_env(env_file.read_bytes())["K"] == "v"
    env_file.unlink()  # the wrapper would have
    assert ((tmp_path / "logs" / "r.log").stat().st_mode & 0o777) == 0o600


def test_start_first_clears_a_stale_unit_of_the_same_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    runner = fake(monkeypatch, show=[(EXITED_3, 0), (RUNNING, 0)], run=[("", 0)])
    adapter().start(spec_for(tmp_path), tmp_path / "r.log")
    assert runner.verbs() == ["show", "stop", "reset-failed", "run", "show"]


def test_start_reports_what_systemd_run_said(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake(monkeypatch, show=[(NOT_FOUND, 0)], run=[("", 1)])
    with pytest.raises(SupervisorError, match="systemd-run .* failed: Failed: boom$"):
        adapter().start(spec_for(tmp_path), tmp_path / "r.log")


def test_exit_status_comes_from_the_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    fake(monkeypatch, show=[(EXITED_3, 0)])
    assert adapter().exit_status(Handle(4242, 4242, 1, UNIT)) == ExitStatus(3, None)


def test_exit_status_of_another_run_of_the_unit_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    fake(monkeypatch, show=[(EXITED_3, 0)])
    assert adapter().exit_status(Handle(999, 999, 1, UNIT)) == ExitStatus(None, None)


def test_exit_status_waits_for_the_manager_to_record_the_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = fake(monkeypatch, show=[(RUNNING, 0), (KILLED_TERM, 0)])
    assert adapter().exit_status(Handle(4242, 4242, 1, UNIT)) == ExitStatus(None, 15)
    assert runner.verbs() == ["show", "show"]


def test_signal_goes_through_systemctl_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = fake(monkeypatch, kill=[("", 0)])
    adapter().signal(Handle(NO_PID, NO_PID, 1, UNIT), signal.SIGTERM)
    assert runner.calls == [systemd.kill_argv(UNIT, signal.SIGTERM)]


def test_signal_falls_back_to_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    fake(monkeypatch, kill=[("", 1)])
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    adapter().signal(Handle(NO_PID, NO_PID, 1, UNIT), signal.SIGKILL)
    assert sent == [(NO_PID, signal.SIGKILL)]


def test_alive_while_the_unit_is_still_stopping(monkeypatch: pytest.MonkeyPatch) -> None:
    fake(monkeypatch, show=[(STOPPING.replace("4242", str(NO_PID)), 0)])
    assert adapter().alive(Handle(NO_PID, NO_PID, 1, UNIT))


def test_not_alive_once_the_unit_has_exited(monkeypatch: pytest.MonkeyPatch) -> None:
    fake(monkeypatch, show=[(EXITED_OK.replace("4242", str(NO_PID)), 0)])
    assert not adapter().alive(Handle(NO_PID, NO_PID, 1, UNIT))


def test_adopt_needs_the_same_live_main_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    ticks = procfs.start_ticks(me) or 0
    fake(monkeypatch, show=[(RUNNING.replace("4242", str(me)), 0)])
    assert adapter().adopt(Handle(me, me, ticks, UNIT))
    assert not adapter().adopt(Handle(me, me, ticks + 1, UNIT))
    assert not adapter().adopt(Handle(4242, 4242, ticks, UNIT))


def test_cleanup_stops_and_resets_the_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = fake(monkeypatch, show=[(EXITED_3, 0)])
    adapter().cleanup(Handle(4242, 4242, 1, UNIT))
    assert runner.verbs() == ["show", "stop", "reset-failed"]


def test_cleanup_leaves_a_newer_run_of_the_unit_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = fake(monkeypatch, show=[(RUNNING, 0)])
    adapter().cleanup(Handle(999, 999, 1, UNIT))
    assert runner.verbs() == ["show"]


def test_unavailable_reason_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def problem() -> str:
        asked.append(1)
        return "no user manager"

    monkeypatch.setattr(systemd, "systemd_problem", problem)
    sup = adapter()
    assert sup.unavailable_reason() == sup.unavailable_reason() == "no user manager"
    assert len(asked) == 1
