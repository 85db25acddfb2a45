"""Activity from the providers' own signals (CONTRACT §9), end to end.

`agentctl run` supervises stand-ins that behave like the CLIs where it matters: a headless one
printing claude's stream-json events under the `process` supervisor, and an interactive one under
tmux that runs the hook commands of the `--settings` file it is given, as claude does. Where
AGENTCTL_TEST_CLI_BIN names their bin dir, the real claude accepts the settings agentctl writes
and runs its hook.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_agent_activity import (CLI_BIN, DEADLINE, NO_CLIS, REFUSED, agent_yaml, inst, metric,
                                           send_keys, wait_activity, write_config)
from tests.e2e.test_supervisors import cleanup_supervisors  # noqa: F401 - the fixture
from tests.fakeapi import FakeModelApi
from tests.helpers import Controller, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
EVENTS = Path(__file__).resolve().parent.parent / "fixtures" / "events"

# Headless: the events of a claude turn (recorded shapes), the result only once told to finish.
HEADLESS = r'''
import os, sys, time
lines = open(os.environ["STANDIN_EVENTS"]).read().splitlines()
for line in lines[:-1]:
    print(line, flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(os.environ["STANDIN_CONTROL"]) and time.monotonic() < deadline:
    time.sleep(0.2)
print(lines[-1], flush=True)  # the result: print mode would exit now; stay to be looked at
time.sleep(120)
'''

# Interactive: its screen always claims to be working, so only the hooks can tell otherwise;
# told "trust", it draws a trust dialog and runs no hook, as claude does before any hook can run.
INTERACTIVE = r'''
import json, os, subprocess, sys, time
settings = json.load(open(sys.argv[sys.argv.index("--settings") + 1]))["hooks"]
control, done = os.environ["STANDIN_CONTROL"], set()
def draw(text):
    sys.stdout.write("\x1b[H\x1b[2J" + text.replace("\n", "\r\n")); sys.stdout.flush()
def hook(event, **fields):
    for group in settings.get(event, []):
        for h in group["hooks"]:  # claude runs a command hook through a shell, its event on stdin
            subprocess.run(h["command"], shell=True, input=json.dumps({"hook_event_name": event, **fields}),
                           text=True, timeout=60)
draw("❯ do the task\n✻ Pondering… (esc to interrupt)\n")
deadline = time.monotonic() + 200
while time.monotonic() < deadline:
    try:
        step = open(control).read().strip()
    except OSError:
        step = ""
    if step and step not in done:
        done.add(step)
        if step == "prompt":
            hook("UserPromptSubmit", prompt="do the task")
        elif step == "stop":
            hook("Stop")
        elif step == "notify":
            hook("Notification", notification_type="permission_prompt", message="Claude needs your permission")
        elif step == "trust":
            draw("Do you trust the files in this folder?\n❯ 1. Yes, I trust this folder\n  2. No, exit\n")
    time.sleep(0.2)
'''


def standin(ctl: Controller, name: str, code: str) -> Path:
    script = ctl.root / name
    script.write_text(f"#!{sys.executable}\n{code}")
    script.chmod(0o755)
    return script


def test_a_headless_instance_shows_the_activity_of_its_json_events(ctl: Controller) -> None:
    control = ctl.root / "finish"
    config = write_config(ctl, claude={"executable": str(standin(ctl, "headless-claude", HEADLESS))},
                          mybot={"executable": sys.executable})
    body = yaml.safe_load(agent_yaml("headless", "claude", cwd=".", env={
        "STANDIN_EVENTS": str(EVENTS / "claude-schema-tool-turn.jsonl"), "STANDIN_CONTROL": str(control)}))
    body["spec"].update(supervisor="process", prompt="summarise the repository")
    ctl.write("h.yaml", yaml.safe_dump(body))
    # a provider with no event rules, headless: no screen and no events to read
    plain = yaml.safe_load(agent_yaml("plain", "mybot", cwd=".", env={}))
    plain["spec"].update(supervisor="process", providerArgs=["-c", "import time; time.sleep(300)"])
    ctl.write("p.yaml", yaml.safe_dump(plain))
    ctl.start("--config", str(config))

    doc = wait_activity(ctl, "headless", "Working")
    pid = inst(doc)["pid"]
    assert inst(doc)["activitySince"]
    wait_for(lambda: metric(ctl, "headless").get("Working") == 1, DEADLINE, message="metric Working")
    control.write_text("")
    doc = wait_activity(ctl, "headless", "Idle", "Result")
    assert inst(doc)["pid"] == pid
    wait_for(lambda: metric(ctl, "headless").get("Idle") == 1, DEADLINE, message="metric Idle")
    assert "Activity: Idle (Result) since " in ctl.cli("describe", "headless").stdout
    wait_activity(ctl, "plain", "Unknown", "NoScreen")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_claude_hooks_report_working_idle_and_waiting_and_a_later_dialog_still_shows(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    control = ctl.root / "control"
    config = write_config(ctl, claude={"executable": str(standin(ctl, "hooked-claude", INTERACTIVE))})
    ctl.write("a.yaml", agent_yaml("hooked", "claude", cwd=".", env={"STANDIN_CONTROL": str(control)}))
    planned = ctl.cli("plan", "--config", str(config))
    settings = ctl.state / "run" / "hooked-0.claude-settings.json"
    assert f"--settings {settings}" in planned.stdout, planned.stdout
    assert not settings.exists()  # plan changes nothing under the state dir
    ctl.start("--config", str(config))

    pid = inst(wait_activity(ctl, "hooked", "Working", "Working"))["pid"]  # the screen, before any hook
    assert settings.stat().st_mode & 0o777 == 0o600
    assert command_of(ctl, "hooked")[1:3] == ["--settings", str(settings)]  # what this run executed
    for step, activity, reason in [("prompt", "Working", "UserPromptSubmit"), ("stop", "Idle", "Stop"),
                                   ("notify", "WaitingForInput", "Notification")]:
        control.write_text(step)
        wait_activity(ctl, "hooked", activity, reason)  # the screen still says Working: the hook wins
    wait_for(lambda: metric(ctl, "hooked").get("WaitingForInput") == 1, DEADLINE, message="metric WaitingForInput")
    control.write_text("trust")
    doc = wait_activity(ctl, "hooked", "WaitingForInput", "TrustPrompt")  # drawn after the last hook ran
    assert inst(doc)["pid"] == pid and (ctl.status("hooked") or {}).get("restarts") == 0
    # deleted for good: its settings and hook state go with it
    state = ctl.state / "run" / "hooked-0.activity"
    assert state.exists()
    ctl.delete("a.yaml")
    wait_for(lambda: ctl.status("hooked") is None, DEADLINE, message="hooked removed")
    assert not settings.exists() and not state.exists()


@pytest.mark.skipif(CLI_BIN is None, reason=NO_CLIS)
def test_real_claude_accepts_the_settings_agentctl_writes_and_runs_its_hook(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    """Interactive under agentctl: claude starts with --settings and stays at its trust prompt (a
    settings file it refused would end it at once); then the same file in print mode, offline,
    runs the UserPromptSubmit hook, which writes the state the sampler reads."""
    cleanup_supervisors(ctl)
    assert CLI_BIN is not None
    home = ctl.root / "home"
    home.mkdir()
    (home / ".claude.json").write_text('{"hasCompletedOnboarding": true}')
    (ctl.root / "work").mkdir()
    env = {"HOME": str(home), "HTTPS_PROXY": REFUSED, "HTTP_PROXY": REFUSED, "TERM": "xterm-256color",
           "PATH": f"{CLI_BIN}:{os.environ.get('PATH', os.defpath)}"}
    config = write_config(ctl, claude={"executable": str(Path(CLI_BIN) / "claude")})
    ctl.write("a.yaml", agent_yaml("cl", "claude", cwd="work", env=env, restartPolicy="Never"))
    ctl.start("--config", str(config))
    settings = ctl.state / "run" / "cl-0.claude-settings.json"
    doc = wait_activity(ctl, "cl", "WaitingForInput", "TrustPrompt")
    argv = command_of(ctl, "cl")
    assert argv[argv.index("--settings") + 1] == str(settings)
    assert (ctl.status("cl") or {}).get("phase") == "Running" and inst(doc)["pid"]

    state = ctl.state / "run" / "cl-0.activity"
    printed = subprocess.Popen([str(Path(CLI_BIN) / "claude"), "--settings", str(settings), "-p", "--output-format",
                                "stream-json", "--verbose", "--", "hi"], cwd=ctl.root / "work", env=env, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = printed.communicate(timeout=120)  # offline and logged out: it ends at once
    finally:
        _kill_group(printed.pid)
        printed.wait(30)
    assert "Settings file" not in err, err
    written = json.loads(state.read_text())
    assert (written["activity"], written["event"]) == ("Working", "UserPromptSubmit")


def command_of(ctl: Controller, name: str) -> list[str]:
    """`describe`'s Command line: the argv the instance's run executed, as a shell reads it."""
    shown = ctl.cli("describe", name).stdout.splitlines()
    return shlex.split(next(line.split(":", 1)[1] for line in shown if line.startswith("Command:")))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, 9)
    except ProcessLookupError:
        pass


# -- the real CLIs, finishing a turn against a model API on loopback (tests/fakeapi.py) ----------
@pytest.mark.skipif(CLI_BIN is None, reason=NO_CLIS)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.timeout(400)
def test_real_claude_interactive_is_idle_when_its_stop_hook_says_so(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    assert CLI_BIN is not None
    home, work = ctl.root / "home", ctl.root / "work"
    home.mkdir()
    work.mkdir()
    key = "sk-ant-loopback-0123456789abcdefghij"
    (home / ".claude.json").write_text(json.dumps({  # no onboarding, trust or API-key question first
        "hasCompletedOnboarding": True, "customApiKeyResponses": {"approved": [key[-20:]], "rejected": []},
        "projects": {str(work): {"hasTrustDialogAccepted": True}}}))
    config = write_config(ctl, claude={"executable": str(Path(CLI_BIN) / "claude")})
    with FakeModelApi() as api:
        env = {"HOME": str(home), "HTTPS_PROXY": REFUSED, "HTTP_PROXY": REFUSED, "NO_PROXY": "127.0.0.1",
               "ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": key, "TERM": "xterm-256color",
               "PATH": f"{CLI_BIN}:{os.environ.get('PATH', os.defpath)}"}
        ctl.write("a.yaml", agent_yaml("cl", "claude", cwd="work", env=env, prompt="say hi", restartPolicy="Never"))
        ctl.start("--config", str(config))
        doc = wait_activity(ctl, "cl", "Idle", "Stop")
        assert any("/messages" in path for path in api.requests), api.requests
        assert (ctl.status("cl") or {}).get("phase") == "Running" and inst(doc)["pid"]
        # a minute at its prompt, claude notifies "waiting for your input": still Idle, nobody is asked
        state = ctl.state / "run" / "cl-0.activity"
        wait_for(lambda: json.loads(state.read_text())["event"] == "Notification", 150,
                 message="claude's idle notification")
        wait_activity(ctl, "cl", "Idle", "Notification")
        ctl.cleanup()  # ends claude before its API goes away


@pytest.mark.skipif(CLI_BIN is None, reason=NO_CLIS)
def test_real_codex_headless_turn_goes_working_then_idle_from_its_events(ctl: Controller) -> None:
    assert CLI_BIN is not None
    home, work = ctl.root / "home", ctl.root / "work"
    (home / ".codex").mkdir(parents=True)
    work.mkdir()
    with FakeModelApi() as api:
        (home / ".codex" / "config.toml").write_text(
            f'model_provider = "loopback"\nmodel = "gpt-5"\n[model_providers.loopback]\nname = "loopback"\n'
            f'base_url = "{api.url}/v1"\nwire_api = "responses"\nenv_key = "OPENAI_API_KEY"\n'
            'supports_websockets = false\n[features]\ndaemon_auto_start = false\n')
        # a wrapper that keeps the instance alive after codex's turn, so its activity can be seen
        wrapper = standin(ctl, "codex-then-wait", f"import subprocess, sys, time\n"
                          f"subprocess.run([{str(Path(CLI_BIN) / 'codex')!r}, *sys.argv[1:]], stdin=subprocess.DEVNULL)\n"
                          "time.sleep(120)\n")
        config = write_config(ctl, codex={"executable": str(wrapper)})
        env = {"HOME": str(home), "HTTPS_PROXY": REFUSED, "HTTP_PROXY": REFUSED, "NO_PROXY": "127.0.0.1",
               "OPENAI_API_KEY": "sk-loopback", "PATH": f"{CLI_BIN}:{os.environ.get('PATH', os.defpath)}"}
        body = yaml.safe_load(agent_yaml("cx", "codex", cwd="work", env=env, prompt="say hi"))
        body["spec"]["supervisor"] = "process"
        ctl.write("a.yaml", yaml.safe_dump(body))
        ctl.start("--config", str(config))
        doc = wait_activity(ctl, "cx", "Idle", "TurnCompleted")
        assert any("/responses" in path for path in api.requests), api.requests
        assert inst(doc)["pid"]
        ctl.cleanup()


@pytest.mark.skipif(CLI_BIN is None, reason=NO_CLIS)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_real_codex_interactive_is_idle_when_its_notify_says_so(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    assert CLI_BIN is not None
    home, work = ctl.root / "home", ctl.root / "work"
    (home / ".codex").mkdir(parents=True)
    work.mkdir()
    with FakeModelApi() as api:
        (home / ".codex" / "config.toml").write_text(
            f'model_provider = "loopback"\nmodel = "gpt-5"\n[model_providers.loopback]\nname = "loopback"\n'
            f'base_url = "{api.url}/v1"\nwire_api = "responses"\nenv_key = "OPENAI_API_KEY"\n'
            'supports_websockets = false\n[features]\ndaemon_auto_start = false\n'
            f'[projects."{work}"]\ntrust_level = "trusted"\n')
        config = write_config(ctl, codex={"executable": str(Path(CLI_BIN) / "codex")})
        env = {"HOME": str(home), "HTTPS_PROXY": REFUSED, "HTTP_PROXY": REFUSED, "NO_PROXY": "127.0.0.1",
               "OPENAI_API_KEY": "sk-loopback", "TERM": "xterm-256color",
               "PATH": f"{CLI_BIN}:{os.environ.get('PATH', os.defpath)}"}
        ctl.write("a.yaml", agent_yaml("cx", "codex", cwd="work", env=env, prompt="say hi", restartPolicy="Never"))
        ctl.start("--config", str(config))
        try:
            doc = wait_activity(ctl, "cx", "Idle", "AgentTurnComplete")
        except AssertionError:
            raise AssertionError(ctl.cli("capture", "cx").stdout) from None
        assert any("/responses" in path for path in api.requests), api.requests
        assert inst(doc)["pid"]
        ctl.cleanup()


@pytest.mark.skipif(CLI_BIN is None, reason=NO_CLIS)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_real_claude_asking_permission_waits_for_a_person_then_finishes_once_allowed(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    assert CLI_BIN is not None
    home, work = ctl.root / "home", ctl.root / "work"
    home.mkdir()
    work.mkdir()
    key = "sk-ant-loopback-0123456789abcdefghij"
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True, "customApiKeyResponses": {"approved": [key[-20:]], "rejected": []},
        "projects": {str(work): {"hasTrustDialogAccepted": True}}}))
    config = write_config(ctl, claude={"executable": str(Path(CLI_BIN) / "claude")})
    with FakeModelApi(tool_command="touch asked-first") as api:
        env = {"HOME": str(home), "HTTPS_PROXY": REFUSED, "HTTP_PROXY": REFUSED, "NO_PROXY": "127.0.0.1",
               "ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": key, "TERM": "xterm-256color",
               "PATH": f"{CLI_BIN}:{os.environ.get('PATH', os.defpath)}"}
        ctl.write("a.yaml", agent_yaml("cl", "claude", cwd="work", env=env, prompt="touch a file",
                                       approvalMode="default", restartPolicy="Never"))
        ctl.start("--config", str(config))
        state = ctl.state / "run" / "cl-0.activity"
        try:
            wait_for(lambda: state.exists() and json.loads(state.read_text())["event"] == "Notification", DEADLINE,
                     message="claude's permission notification")
        except AssertionError:
            raise AssertionError(ctl.cli("capture", "cl").stdout) from None
        assert json.loads(state.read_text())["activity"] == "WaitingForInput"
        wait_activity(ctl, "cl", "WaitingForInput")
        assert not (work / "asked-first").exists()  # nobody answered: the command did not run
        send_keys(ctl, "cl-0", "Enter")  # its first answer: yes, run it
        wait_activity(ctl, "cl", "Idle", "Stop")  # the command ran, the turn ended
        assert (work / "asked-first").exists()
        ctl.cleanup()
