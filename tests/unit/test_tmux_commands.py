"""tmux adapter: names, escaping, command lines and list-panes parsing (no tmux needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from controller.model import Handle, InstanceSpec
from controller.supervisors import tmux
from controller.supervisors.base import Context, ExitStatus, Supervisor, SupervisorError


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


def test_single_word_command_is_run_by_env_not_by_a_shell() -> None:
    assert tmux.pane_argv(["agent"]) == ["env", "--", "agent"]
    assert tmux.pane_argv(["agent", "--x"]) == ["agent", "--x"]


def test_create_commands_hold_the_pane_and_pipe_it_before_the_command_runs() -> None:
    cmds = tmux.create_commands("a-0", shell="/bin/bash", log_path=Path("/logs/it's #1.log"))
    assert [c[0] for c in cmds] == ["set-option", "new-session", "set-option", "pipe-pane"]
    assert cmds[1][-3:] == ["--", "cat", "-"]
    assert cmds[2] == ["set-option", "-w", "-t", "=a-0:", "remain-on-exit", "on"]
    assert cmds[3] == ["pipe-pane", "-t", "=a-0:", "cat >> '/logs/it'\"'\"'s ##1.log'"]


def test_respawn_passes_argv_as_words_and_only_terminal_vars_as_flags() -> None:
    cmd = tmux.respawn_command("r-0", spec(env=(("TERM", "xterm"), ("FOO", "bar"))))
    assert cmd == [
        "respawn-pane", "-k", "-t", "=r-0:", "-c", "/srv/work", "-e", "TERM=xterm", "--", "python3", "-u", "agent.py",
    ]  # fmt: skip


def test_environment_is_set_per_variable_and_chunked_under_the_size_limit() -> None:
    env = {f"V{i}": "x" * 3000 for i in range(10)}
    cmds = tmux.env_commands("s", env)
    assert cmds[0] == ["set-environment", "-t", "=s", "V0", "x" * 3000]
    chunks = tmux.chunk_commands(cmds)
    assert sum(len(c) for c in chunks) == 10
    assert len(chunks) > 1
    assert all(sum(tmux.command_bytes(c) for c in chunk) <= tmux.MAX_COMMAND_BYTES for chunk in chunks)


def test_a_variable_too_big_for_tmux_is_refused_without_showing_its_value() -> None:
    with pytest.raises(SupervisorError, match="HUGE") as err:
        tmux.env_commands("s", {"HUGE": "secret" * 5000})
    assert "secret" not in str(err.value)
    assert not err.value.retryable


def test_chunking_nothing_gives_no_chunks() -> None:
    assert tmux.chunk_commands([]) == []


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


def test_pane_shell_falls_back_to_sh_for_unusable_shells() -> None:
    assert tmux.pane_shell({"SHELL": "/bin/sh"}) == "/bin/sh"
    assert tmux.pane_shell({"SHELL": "fish"}) == "/bin/sh"
    assert tmux.pane_shell({}) == "/bin/sh"


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
