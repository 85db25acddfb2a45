"""Activity from the providers' own signals (CONTRACT §9): the JSON events of headless runs
(recorded from the real CLIs, tests/fixtures/events), the hook state interactive sessions
write, and how a hook state is weighed against the screen."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller import events, hooks, hookstate
from controller.activity import Activity, Reading

EVENTS = Path(__file__).resolve().parent.parent / "fixtures" / "events"


def fixture(name: str) -> bytes:
    return (EVENTS / f"{name}.jsonl").read_bytes()


def prefix(name: str, lines: int) -> bytes:
    return b"".join(fixture(name).splitlines(keepends=True)[:lines])


@pytest.mark.parametrize(("name", "lines", "activity", "reason"), [
    ("claude-2.1.332-offline-retrying", 1, Activity.WORKING, "Started"),
    ("claude-2.1.332-offline-retrying", 99, Activity.UNKNOWN, "Reconnecting"),
    ("claude-2.1.332-not-logged-in", 99, Activity.UNKNOWN, "ResultError"),
    ("claude-schema-tool-turn", 2, Activity.WORKING, "Assistant"),
    ("claude-schema-tool-turn", 3, Activity.WORKING, "ToolResult"),
    ("claude-schema-tool-turn", 99, Activity.IDLE, "Result"),
    ("codex-0.171.0-offline-reconnecting", 2, Activity.WORKING, "TurnStarted"),
    ("codex-0.171.0-offline-reconnecting", 99, Activity.UNKNOWN, "Reconnecting"),
    ("codex-schema-turn-completed", 3, Activity.WORKING, "Item"),
    ("codex-schema-turn-completed", 99, Activity.IDLE, "TurnCompleted"),
    ("codex-schema-turn-failed", 99, Activity.UNKNOWN, "TurnFailed"),
    ("claude-2.1.332-loopback-turn", 2, Activity.WORKING, "Assistant"),
    ("claude-2.1.332-loopback-turn", 99, Activity.IDLE, "Result"),
    ("codex-0.171.0-loopback-turn", 3, Activity.WORKING, "TurnStarted"),
    ("codex-0.171.0-loopback-turn", 99, Activity.IDLE, "TurnCompleted"),
])
def test_the_newest_event_of_a_headless_run_tells_its_activity(name: str, lines: int, activity: Activity,
                                                               reason: str) -> None:
    reading = events.classify_tail(prefix(name, lines), name.split("-")[0], from_start=True)
    assert reading is not None and (reading.activity, reading.reason) == (activity, reason)


def test_a_line_still_being_written_and_the_cut_first_line_are_not_read() -> None:
    tail = fixture("claude-schema-tool-turn")
    half = tail[: len(tail) - 40]  # the result line is half written: the last whole event counts
    assert events.classify_tail(half, "claude", from_start=True) == events.classify_tail(
        prefix("claude-schema-tool-turn", 4), "claude", from_start=True)
    # a tail that starts inside a line does not take its end for an event
    cut = b'"type":"result"}\n' + b"plain text of a wrapper\n"
    assert events.classify_tail(cut, "claude") is None


def test_other_output_between_events_is_skipped() -> None:
    noisy = prefix("codex-schema-turn-completed", 2) + b"WARNING: proceeding\n{not json\n[1,2]\n"
    reading = events.classify_tail(noisy, "codex", from_start=True)
    assert reading is not None and reading.reason == "TurnStarted"
    assert events.classify_tail(b"no events at all\n", "codex", from_start=True) is None
    assert events.classify_tail(fixture("codex-schema-turn-completed"), "mybot", from_start=True) is None


def test_retries_are_not_progress_but_new_events_are() -> None:
    retrying = fixture("claude-2.1.332-offline-retrying")
    fewer = b"".join(retrying.splitlines(keepends=True)[:-1])
    one, two = (events.classify_tail(t, "claude", from_start=True) for t in (fewer, retrying))
    assert one is not None and two is not None and one.fingerprint == two.fingerprint
    a, b = (events.classify_tail(prefix("claude-schema-tool-turn", n), "claude", from_start=True) for n in (2, 4))
    assert a is not None and b is not None and a.fingerprint != b.fingerprint


# -- the hook command ------------------------------------------------------------------------
def run_hook(state: Path, activity: str, stdin: str = "", *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*hooks.command(state, activity), *extra], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_hook_command_writes_the_state_the_sampler_reads(tmp_path: Path) -> None:
    state = tmp_path / "a-0.activity"
    done = run_hook(state, "Working", json.dumps({"hook_event_name": "UserPromptSubmit", "prompt": "hi"}))
    assert done.returncode == 0, done.stderr
    got = hooks.read_state(state)
    assert got is not None and (got.activity, got.reason) == (Activity.WORKING, "UserPromptSubmit")
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    # claude's Notification after 60 s at its prompt is Idle, not a question
    run_hook(state, "WaitingForInput", json.dumps({"hook_event_name": "Notification", "notification_type": "idle_prompt"}))
    got = hooks.read_state(state)
    assert got is not None and got.activity == Activity.IDLE
    # codex's notify appends its JSON as the last argument
    run_hook(state, "Idle", "", json.dumps({"type": "agent-turn-complete", "turn-id": "1"}))
    got = hooks.read_state(state)
    assert got is not None and (got.activity, got.reason) == (Activity.IDLE, "AgentTurnComplete")


def test_the_payloads_real_claude_gives_its_hooks_map_to_activities() -> None:
    configured = {**hooks.CLAUDE_HOOKS}
    seen = []
    for line in (EVENTS / "claude-2.1.332-hook-payloads.jsonl").read_text().splitlines():
        data = json.loads(line)
        event = data["hook_event_name"]
        if event in configured:
            seen.append((event, hookstate.state(configured[event], data, 1.0)["activity"]))
    # the Notification after a minute at the prompt is not a person being asked something
    assert seen == [("UserPromptSubmit", "Working"), ("Stop", "Idle"), ("Notification", "Idle")]


def test_a_broken_hook_never_fails_the_provider(tmp_path: Path) -> None:
    assert run_hook(tmp_path / "missing-dir" / "a.activity", "Idle").returncode == 0
    assert run_hook(tmp_path / "a.activity", "Sleeping").returncode == 0
    assert hooks.read_state(tmp_path / "a.activity") is None
    (tmp_path / "b.activity").write_text("{garbage")
    assert hooks.read_state(tmp_path / "b.activity") is None


def test_claude_settings_run_the_hook_command_for_each_event(tmp_path: Path) -> None:
    state = tmp_path / "run" / "a-0.activity"
    doc = hooks.claude_settings(state)
    path = hooks.settings_path(tmp_path / "run", "a-0")
    hooks.write_settings(path, doc)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = json.loads(path.read_text())["hooks"]
    assert set(written) == {"UserPromptSubmit", "PostToolUse", "Stop", "Notification"}
    cmd = written["Stop"][0]["hooks"][0]["command"]
    assert cmd.split()[-2:] == [str(state), "Idle"] and hookstate.__file__.rstrip("c") in cmd


def test_the_codex_notify_override_is_a_toml_array_of_the_command(tmp_path: Path) -> None:
    import tomllib

    value = hooks.codex_notify(tmp_path / "a-0.activity")
    assert tomllib.loads(value)["notify"] == [sys.executable, "-I", "-S", hooks.HOOKSTATE,
                                              str(tmp_path / "a-0.activity"), "Idle"]


# -- weighing a hook state against the screen ------------------------------------------------
SCREEN_WORKING = Reading(Activity.WORKING, "Working", "fp")
TRUST = Reading(Activity.WAITING_FOR_INPUT, "TrustPrompt", "fp")


def test_without_a_hook_state_of_this_run_the_screen_decides() -> None:
    assert hooks.combine(TRUST, None, screen_since=10.0, provider="claude", run_started=0.0) == TRUST
    old = hooks.HookState(Activity.IDLE, "Stop", 5.0)  # from the run before
    assert hooks.combine(SCREEN_WORKING, old, screen_since=10.0, provider="claude", run_started=8.0) == SCREEN_WORKING


def test_a_fresh_hook_state_wins_over_the_screen() -> None:
    stop = hooks.HookState(Activity.IDLE, "Stop", 20.0)
    got = hooks.combine(SCREEN_WORKING, stop, screen_since=25.0, provider="claude", run_started=1.0)
    assert got == Reading(Activity.IDLE, "Stop", "fp")  # the screen's fingerprint still tracks progress


def test_a_dialog_the_screen_shows_after_the_last_hook_wins() -> None:
    working = hooks.HookState(Activity.WORKING, "UserPromptSubmit", 20.0)
    assert hooks.combine(TRUST, working, screen_since=25.0, provider="claude", run_started=1.0) == TRUST
    assert hooks.combine(TRUST, working, screen_since=15.0, provider="claude", run_started=1.0).activity == Activity.WORKING


def test_codex_working_on_screen_after_its_last_notify_wins() -> None:
    done = hooks.HookState(Activity.IDLE, "AgentTurnComplete", 20.0)
    assert hooks.combine(SCREEN_WORKING, done, screen_since=30.0, provider="codex", run_started=1.0) == SCREEN_WORKING
    assert hooks.combine(SCREEN_WORKING, done, screen_since=30.0, provider="claude", run_started=1.0).activity == Activity.IDLE


# -- the sampler's bounded read of a log tail ------------------------------------------------
def test_the_log_tail_is_bounded_starts_at_the_run_and_survives_rotation(tmp_path: Path) -> None:
    from controller.activity_sampler import _log_tail

    log = tmp_path / "a-0.log"
    log.write_bytes(b"x" * 100 + fixture("codex-schema-turn-completed"))
    size, tail = _log_tail(log, 100, seen_size=-1)
    assert tail == fixture("codex-schema-turn-completed") and size == log.stat().st_size
    assert _log_tail(log, 100, seen_size=size) == (size, None)  # unchanged: nothing to parse
    log.write_bytes(b"z" * (events.TAIL_BYTES + 10))
    assert len(_log_tail(log, 0, seen_size=size)[1] or b"") == events.TAIL_BYTES
    log.write_bytes(b'{"type":"turn.started"}\n')  # rotated: smaller than the run's offset
    size, tail = _log_tail(log, 5000, seen_size=-1)
    assert events.classify_tail(tail or b"", "codex", from_start=True) is not None
    assert _log_tail(tmp_path / "gone.log", 0, seen_size=7) == (7, None)


# -- the argv of a start (sessions.prepare) ---------------------------------------------------
def prepared(tmp_path: Path, provider: str, *, write_files: bool = True, **spec: Any) -> list[str]:
    from controller import sessions
    from controller.providers import BUILTIN
    from tests.unit.builders import desired

    agent = desired("rev", command=None, provider=provider, **spec)
    inst = agent.instances[0]
    got, session = sessions.prepare(inst, agent.spec, BUILTIN, None, log_path=tmp_path / "logs" / "rev-0.log",
                                    write_files=write_files)
    assert list(session.argv) == list(got.argv)  # what the record (describe's Command) shows
    return list(got.argv)


def test_an_interactive_claude_start_gets_its_hook_settings_and_the_spec_keeps_none(tmp_path: Path) -> None:
    settings = tmp_path / "run" / "rev-0.claude-settings.json"
    assert prepared(tmp_path, "claude", write_files=False, supervisor="tmux", prompt="p") == [
        "claude", "--settings", str(settings), "--", "p"]
    assert not settings.exists()  # plan
    prepared(tmp_path, "claude", supervisor="tmux", prompt="p")
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600 and json.loads(settings.read_text())["hooks"]
    with_session = prepared(tmp_path, "claude", supervisor="tmux", prompt="p", session={"resume": True})
    assert with_session[1] == "--session-id" and with_session[3:5] == ["--settings", str(settings)]
    # headless claude reads its events instead: no settings
    assert "--settings" not in prepared(tmp_path, "claude", supervisor="process", prompt="p")


def test_an_interactive_codex_start_gets_its_notify_program(tmp_path: Path) -> None:
    argv = prepared(tmp_path, "codex", supervisor="tmux")
    assert argv == ["codex", "--no-daemon", "-c", hooks.codex_notify(tmp_path / "run" / "rev-0.activity")]
    assert "notify" not in " ".join(prepared(tmp_path, "codex", supervisor="process", prompt="p"))


def test_a_settings_file_that_cannot_be_written_leaves_the_start_without_hooks(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a directory")
    assert prepared(tmp_path, "claude", supervisor="tmux", prompt="p") == ["claude", "--", "p"]
