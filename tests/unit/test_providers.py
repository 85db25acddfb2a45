"""Built-in claude and codex presets (CONTRACT §9): argv per mode and field, session flags,
per-provider validation, and the one-line argv display. No CLI runs here (see
tests/e2e/test_agent_presets.py for stand-ins and the real CLIs)."""

from __future__ import annotations

import json
import shlex
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.desired import DesiredAgent
from controller.manifests import AgentSpec, parse_text
from controller.providers import BUILTIN, SessionArgs, check, display_argv, merge_presets, mode_of, render
from controller.sessions import session_file_id, thread_id_in_log
from tests.unit.builders import desired, manifest_yaml, parse_manifest

CLAUDE_HEADLESS = ("claude", "-p", "--output-format", "stream-json", "--verbose")
CODEX_HEADLESS = ("codex", "exec", "--json", "--skip-git-repo-check", "-c", 'sandbox_mode="workspace-write"',
                  "-c", 'approval_policy="never"')


def agent(provider: str, **spec: Any) -> DesiredAgent:
    return desired(command=None, provider=provider, **spec)


def argv(provider: str, **spec: Any) -> tuple[str, ...]:
    return agent(provider, **spec).instances[0].argv


def spec_of(provider: str, **spec: Any) -> AgentSpec:
    return parse_manifest(manifest_yaml(command=None, provider=provider, **spec)).spec


# -- modes ---------------------------------------------------------------------------

def test_mode_defaults_to_interactive_under_tmux_and_headless_elsewhere() -> None:
    assert mode_of(spec_of("claude", supervisor="tmux")) == "interactive"
    for supervisor in ("process", "systemd"):
        assert mode_of(spec_of("claude", supervisor=supervisor, prompt="p")) == "headless"
    assert mode_of(spec_of("claude", supervisor="tmux", mode="headless", prompt="p")) == "headless"


def test_claude_interactive_maps_every_field_and_puts_the_prompt_after_double_dash() -> None:
    assert argv("claude", supervisor="tmux", model="opus", effort="high", approvalMode="plan",
                prompt="-review the diff", providerArgs=["--add-dir", "/srv"]) == (
        "claude", "--model", "opus", "--effort", "high", "--permission-mode", "plan", "--add-dir", "/srv",
        "--", "-review the diff")


def test_claude_headless_is_print_mode_with_stream_json_events() -> None:
    assert argv("claude", model="opus", prompt="go") == (*CLAUDE_HEADLESS, "--model", "opus", "--", "go")


def test_unset_fields_drop_their_flags() -> None:
    assert argv("claude", supervisor="tmux") == ("claude",)
    assert argv("claude", supervisor="tmux", prompt="hi") == ("claude", "--", "hi")
    assert argv("codex", supervisor="tmux") == ("codex", "--no-daemon")


def test_codex_interactive_maps_effort_to_a_config_override_and_approval_to_its_flag() -> None:
    assert argv("codex", supervisor="tmux", model="o3", effort="high", approvalMode="never", prompt="-fix",
                providerArgs=["--search"]) == (
        "codex", "--no-daemon", "--model", "o3", "-c", "model_reasoning_effort=high", "--ask-for-approval", "never",
        "--search",
        "--", "-fix")


def test_codex_headless_is_exec_json_unattended_in_a_workspace_sandbox() -> None:
    assert argv("codex", model="o3", effort="low", prompt="go") == (
        *CODEX_HEADLESS, "--model", "o3", "-c", "model_reasoning_effort=low", "--", "go")


def test_spec_command_replaces_only_the_preset_executable() -> None:
    wrapped = desired(command=["/opt/wrap", "--sandbox"], provider="claude", supervisor="tmux", model="opus")
    assert wrapped.instances[0].argv == ("/opt/wrap", "--sandbox", "--model", "opus")


def test_a_config_override_of_the_executable_keeps_the_templates() -> None:
    presets = merge_presets({"claude": {"executable": "/opt/bin/claude"}})
    assert desired(command=None, provider="claude", presets=presets, prompt="p").instances[0].argv == (
        "/opt/bin/claude", *CLAUDE_HEADLESS[1:], "--", "p")
    assert presets["codex"] == BUILTIN["codex"]


def test_a_config_args_template_serves_both_modes_and_takes_provider_args_at_the_end() -> None:
    presets = merge_presets({"mybot": {"args": ["--prompt", "{prompt}"]}})
    for supervisor in ("tmux", "process"):
        assert desired(command=None, provider="mybot", presets=presets, supervisor=supervisor, prompt="p",
                       providerArgs=["-v"]).instances[0].argv == ("mybot", "--prompt", "p", "-v")


def test_every_preset_documents_the_cli_version_it_was_checked_against() -> None:
    assert BUILTIN["claude"].checked_against.startswith("claude 2.1.332")
    assert BUILTIN["codex"].checked_against == "codex-cli 0.171.0"


# -- sessions ------------------------------------------------------------------------

SID = "3f0f1e1c-1111-4222-8333-444455556666"


def test_claude_first_start_names_the_session_and_later_starts_resume_it() -> None:
    spec = spec_of("claude", supervisor="tmux", prompt="p", session={"resume": True})
    first, _ = render(BUILTIN["claude"], spec, SessionArgs(new_id=SID))
    later, _ = render(BUILTIN["claude"], spec, SessionArgs(resume_id=SID))
    assert first == ["claude", "--session-id", SID, "--", "p"]
    assert later == ["claude", "--resume", SID, "--", "p"]


def test_codex_resumes_through_its_resume_subcommands() -> None:
    inter = spec_of("codex", supervisor="tmux", model="o3", session={"resume": True})
    head = spec_of("codex", model="o3", prompt="go", session={"resume": True})
    assert render(BUILTIN["codex"], inter, SessionArgs(resume_id=SID))[0] == [
        "codex", "resume", SID, "--no-daemon", "--model", "o3"]
    assert render(BUILTIN["codex"], head, SessionArgs(resume_id=SID))[0] == [
        "codex", "exec", "resume", SID, *CODEX_HEADLESS[2:], "--model", "o3", "--", "go"]
    assert render(BUILTIN["codex"], head)[0][:3] == ["codex", "exec", "--json"], "no id known: a new session"


def test_session_resume_changes_the_spec_hash_only_when_set() -> None:
    plain, off = agent("claude", prompt="p"), agent("claude", prompt="p", session={"resume": False})
    assert plain.spec_hash == off.spec_hash != agent("claude", prompt="p", session={"resume": True}).spec_hash


# -- validation ----------------------------------------------------------------------

def problems(provider: str, *, as_root: bool = False, **spec: Any) -> list[str]:
    return [m for _, m in check(provider, BUILTIN[provider], spec_of(provider, **spec), as_root=as_root)]


@pytest.mark.parametrize(("provider", "mode", "value"), [
    ("claude", "interactive", "acceptEdits"), ("claude", "headless", "plan"), ("claude", "interactive", "dontAsk"),
    ("codex", "interactive", "on-request"), ("codex", "interactive", "never"), ("codex", "headless", "never"),
])
def test_approval_modes_each_cli_accepts_are_valid(provider: str, mode: str, value: str) -> None:
    supervisor = "tmux" if mode == "interactive" else "process"
    assert problems(provider, supervisor=supervisor, mode=mode, approvalMode=value, prompt="p") == []


@pytest.mark.parametrize(("provider", "mode", "value"), [
    ("claude", "interactive", "on-request"), ("codex", "interactive", "untrusted"),
    ("codex", "interactive", "acceptEdits"), ("codex", "headless", "on-request"),
])
def test_approval_modes_a_cli_refuses_are_errors_naming_what_it_accepts(provider: str, mode: str, value: str) -> None:
    supervisor = "tmux" if mode == "interactive" else "process"
    found = problems(provider, supervisor=supervisor, mode=mode, approvalMode=value, prompt="p")
    assert len(found) == 1 and f"'{value}' is not accepted by {provider} in {mode} mode" in found[0], found


def test_unknown_effort_is_an_error_per_provider() -> None:
    assert problems("claude", prompt="p", effort="max") == []
    assert problems("codex", prompt="p", effort="xhigh") == []
    assert "spec.effort: 'max' is not accepted by codex" in problems("codex", prompt="p", effort="max")[0]


def test_headless_without_a_prompt_is_an_error() -> None:
    assert "needs a prompt" in problems("claude")[0]
    assert problems("claude", supervisor="tmux") == []


def test_bypass_permissions_as_root_is_an_error_unless_sandboxed() -> None:
    assert "refuses bypassPermissions when run as root" in problems(
        "claude", as_root=True, prompt="p", approvalMode="bypassPermissions")[0]
    assert problems("claude", as_root=False, prompt="p", approvalMode="bypassPermissions") == []


def test_resume_with_a_preset_that_cannot_resume_is_an_error() -> None:
    presets = merge_presets({"mybot": {"args": ["{prompt}"]}})
    spec = spec_of("mybot", prompt="p", session={"resume": True})
    assert "has no way to resume" in check("mybot", presets["mybot"], spec, as_root=False)[0][1]


def test_explicit_interactive_mode_without_tmux_is_an_error_at_its_line() -> None:
    text = "\n".join(["apiVersion: agentctl/v1", "kind: Agent", "metadata: {name: a}", "spec:",
                      "  provider: claude", "  supervisor: process", "  prompt: p", "  mode: interactive", ""])
    docs, errors = parse_text(text, "a.yaml")
    assert not docs and [str(e) for e in errors] == [
        "a.yaml:8: spec.mode: interactive mode needs a terminal: supervisor tmux, not process (or mode: headless)"]


def test_mode_and_session_need_a_provider() -> None:
    for field in ({"mode": "headless"}, {"session": {"resume": True}}):
        _, errors = parse_text(manifest_yaml(**field), "a.yaml")
        assert errors and "only meaningful with a provider" in errors[0].message


# -- display -------------------------------------------------------------------------

def test_display_argv_is_one_line_a_shell_reads_back_as_the_same_argv() -> None:
    args = ["claude", "--", "-fix it\nnow", "it's", "tab\there"]
    line = display_argv(args)
    assert "\n" not in line
    plain = [a for a in args if a.isprintable()]
    assert shlex.split(display_argv(plain)) == plain


# -- finding codex's own session id (sessions.py, on files under tmp_path) --------------------

def rollout(home: Path, sid: str, cwd: str, at: float) -> None:
    stamp = datetime.fromtimestamp(at, UTC)
    day = home / "sessions" / stamp.strftime("%Y/%m/%d")
    day.mkdir(parents=True, exist_ok=True)
    meta = {"type": "session_meta", "payload": {"id": sid, "cwd": cwd,
                                                "timestamp": stamp.isoformat().replace("+00:00", "Z")}}
    (day / f"rollout-{stamp:%Y-%m-%dT%H-%M-%S}-{sid}.jsonl").write_text(json.dumps(meta) + "\n{}\n")


def test_codex_session_file_of_this_cwd_started_since_the_run_and_not_taken_is_chosen(tmp_path: Path) -> None:
    now = time.time()
    rollout(tmp_path, "old", "/w", now - 3600)
    rollout(tmp_path, "elsewhere", "/other", now + 1)
    rollout(tmp_path, "taken", "/w", now + 1)
    rollout(tmp_path, "mine", "/w", now + 2)
    rollout(tmp_path, "later", "/w", now + 30)
    assert session_file_id(tmp_path, "/w", now, taken={"taken"}) == "mine"
    assert session_file_id(tmp_path / "missing", "/w", now, taken=()) == ""


def test_codex_thread_id_is_read_from_the_run_that_announced_it(tmp_path: Path) -> None:
    log = tmp_path / "cx-0.log"
    first = '{"type":"thread.started","thread_id":"01a241ec-ff66-7233-a3aa-8a1f5d54db15"}\n'
    log.write_text(first + "noise\n")
    offset = log.stat().st_size
    with log.open("a") as fh:
        fh.write('{"type":"thread.started","thread_id":"02b241ec-ff66-7233-a3aa-8a1f5d54db15"}\n')
    assert thread_id_in_log(log, 0) == "01a241ec-ff66-7233-a3aa-8a1f5d54db15"
    assert thread_id_in_log(log, offset) == "02b241ec-ff66-7233-a3aa-8a1f5d54db15"
    assert thread_id_in_log(tmp_path / "none.log", 0) == ""
