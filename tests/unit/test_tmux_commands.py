"""tmux adapter: names, escaping, command lines and list-panes parsing (no tmux needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from controller import envexec
from controller.model import Handle, InstanceSpec
from controller.supervisors import tmux
from controller.supervisors.base import Context, ExitStatus, Supervisor


def spec(argv: tuple[str, ...] = ("python3", "-u", "agent.py"), env: tuple[tuple[str, str], ...] = ()) -> InstanceSpec:
    return InstanceSpec(
        id="reviewer-0", agent="reviewer", index=0, supervisor="tmux", argv=argv, env=env, cwd="/srv/work", spec_hash="h"
    )


def test_adapter_satisfies_the_supervisor_protocol() -> None:
    adapter: Supervisor = tmux.TmuxSupervisor(Context(Path("/tmp/s"), "c1"))
    assert adapter.kind == "tmux" and adapter.blocking


@pytest.mark.parametrize(
    ("instance", "expected"),
    [("reviewer-0", "reviewer-0"), ("a.b:c", "a_b_c"), ("x y/z", "x_y_z"), ("", "_")],
)
def test_session_name_drops_characters_tmux_forbids(instance: str, expected: str) -> None:
    assert tmux.session_name(instance) == expected


def test_short_state_dir_puts_the_socket_inside_it() -> None:
    ctx = Context(Path("/var/lib/agentctl"), "c1")
    assert tmux.socket_args(ctx) == ["-S", "/var/lib/agentctl/tmux.sock"]


def test_long_state_dir_falls_back_to_a_named_socket() -> None:
    ctx = Context(Path("/" + "d" * 120), "c1:x")
    assert tmux.socket_args(ctx) == ["-L", "agentctl-c1_x"]


def test_every_call_ignores_the_users_tmux_conf() -> None:
    argv = tmux.tmux_argv(Context(Path("/s"), "c"), ["list-sessions"])
    assert argv == ["tmux", "-S", "/s/tmux.sock", "-f", "/dev/null", "list-sessions"]


@pytest.mark.parametrize(
    ("arg", "expected"),
    [("plain", "plain"), ("a;", "a\\;"), ("a\\;", "a\\\\;"), (";", "\\;"), ("a;b", "a;b"), ("", "")],
)
def test_trailing_semicolon_is_escaped_so_tmux_does_not_split_the_command(arg: str, expected: str) -> None:
    assert tmux.escape_arg(arg) == expected


def test_command_line_joins_commands_with_separators() -> None:
    line = tmux.command_line([["a", "x;"], ["b"]])
    assert line == ["a", "x\\;", ";", "b"]


def test_format_expanded_arguments_double_the_hash() -> None:
    assert tmux.escape_format("/tmp/#{x}/#1") == "/tmp/##{x}/##1"


def test_create_commands_hold_the_pane_and_pipe_it_before_the_command_runs() -> None:
    cmds = tmux.create_commands("a-0", log_path=Path("/logs/it's #1.log"))
    assert [c[0] for c in cmds] == ["new-session", "set-option", "pipe-pane"]
    assert cmds[0][-3:] == ["--", "cat", "-"]
    assert cmds[1] == ["set-option", "-w", "-t", "=a-0:", "remain-on-exit", "on"]
    assert cmds[2] == ["pipe-pane", "-t", "=a-0:", "cat >> '/logs/it'\"'\"'s ##1.log'"]


def test_respawn_runs_the_wrapper_argv_and_carries_no_env_value() -> None:
    wrapper = envexec.command(["python3", "-u", "agent.py"], env_file="/state/run/r-0.ab.env", cgroup="/cg/r-0")
    cmd = tmux.respawn_command("r-0", spec(env=(("TERM", "xterm"), ("FOO", "s3cr3t-value"))), wrapper)
    assert cmd[:6] == ["respawn-pane", "-k", "-t", "=r-0:", "-c", "/srv/work"]
    assert cmd[6] == "--" and cmd[7:] == wrapper
    assert wrapper[-4:] == ["--", "python3", "-u", "agent.py"]
    assert "--env-file" in wrapper and "--cgroup" in wrapper
    assert not any("s3cr3t-value" in arg or "xterm" in arg for arg in cmd)


def test_pane_env_keeps_tmux_terminal_vars_unless_the_manifest_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("AGENTCTL_TEST_INHERITED", "yes")
    env = tmux.pane_env(spec(env=(("FOO", "bar"),)))
    assert "TERM" not in env and env["FOO"] == "bar" and env["AGENTCTL_TEST_INHERITED"] == "yes"
    assert tmux.pane_env(spec(env=(("TERM", "xterm"),)))["TERM"] == "xterm"


def test_parse_live_pane() -> None:
    assert tmux.parse_pane("r-0|4242|0||\n") == tmux.PaneState("r-0", 4242, False, None, None)


def test_exit_code_of_a_dead_pane() -> None:
    pane = tmux.parse_pane("r-0|4242|1|3|")
    assert tmux.pane_exit(pane) == ExitStatus(3, None)


def test_signal_of_a_dead_pane() -> None:
    pane = tmux.parse_pane("r-0|4242|1||15")
    assert tmux.pane_exit(pane) == ExitStatus(None, 15)


def test_live_or_missing_pane_has_no_exit_status() -> None:
    assert tmux.pane_exit(tmux.parse_pane("r-0|4242|0||")) == ExitStatus(None, None)
    assert tmux.pane_exit(None) == ExitStatus(None, None)


@pytest.mark.parametrize("line", ["", "garbage", "r|x|1||", "r|1|0"])
def test_unparseable_pane_lines_give_none(line: str) -> None:
    assert tmux.parse_pane(line) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("tmux 3.3a\n", (3, 3)), ("tmux next-3.5", (3, 5)), ("tmux 2.9", (2, 9)), ("tmux master", None)],
)
def test_parse_version(text: str, expected: tuple[int, int] | None) -> None:
    assert tmux.parse_version(text) == expected


def test_client_env_is_small_and_carries_the_instance_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "x")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = tmux.client_env("/opt/bin:/usr/bin")
    assert env["PATH"] == "/opt/bin:/usr/bin"
    assert env["LANG"] == "C.UTF-8"
    assert "SECRET_TOKEN" not in env


def test_attach_argv_targets_the_exact_session() -> None:
    ctx = Context(Path("/var/lib/agentctl"), "c1")
    handle = Handle(pid=1, pgid=1, start_ticks=1, unit="reviewer-0")
    assert tmux.attach_argv(ctx, handle) == [
        "tmux", "-S", "/var/lib/agentctl/tmux.sock", "attach-session", "-t", "=reviewer-0",
    ]  # fmt: skip


def test_missing_tmux_is_an_unavailable_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    assert tmux.TmuxSupervisor(Context(Path("/tmp/s"), "c1")).unavailable_reason() == "tmux not found in PATH"


def test_a_missing_binary_reads_as_no_session_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tmux, "TMUX", "/nonexistent/tmux")
    ctx = Context(Path("/tmp/s"), "c1")
    assert tmux.read_pane(ctx, "a-0") is None
    assert not tmux.TmuxSupervisor(ctx).adopt(Handle(pid=1, pgid=1, start_ticks=1, unit="a-0"))
