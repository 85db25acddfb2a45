"""Activity of AI sessions and terminal-faithful logs (CONTRACT §9), end to end.

`agentctl run` supervises provider agents under tmux: a stand-in that draws claude-like
screens on command (Working, Idle, a question, a stall) and, where AGENTCTL_TEST_CLI_BIN
names their bin dir, the real claude and codex CLIs with HOME in a temp dir and all their
traffic refused at once (HTTPS_PROXY to a closed port): their trust and login screens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.supervisors import tmux as tmux_adapter
from controller.supervisors.base import Context
from tests.e2e.test_supervisors import cleanup_supervisors  # noqa: F401 - the fixture
from tests.helpers import Controller, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
CLI_BIN = os.environ.get("AGENTCTL_TEST_CLI_BIN")
NO_CLIS = "AGENTCTL_TEST_CLI_BIN is not set (.ci/run sets it to the bin dir of the locked claude and codex)"
DEADLINE = 60.0  # a loaded 2-core box: starts and samples are slow
HOLD = 15.0  # "well over" logIdleSeconds 5: three times it
REFUSED = "http://127.0.0.1:9"  # nothing listens on port 9: every request of the CLIs fails at once

if shutil.which("tmux") is None:
    pytest.skip("tmux is not installed", allow_module_level=True)

# A stand-in for claude: draws what the control file asks for, the way claude's screen reads.
STANDIN = r'''
import os, sys, time
control = os.environ["STANDIN_CONTROL"]
words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
def draw(text):
    sys.stdout.write("\x1b[H\x1b[2J" + text.replace("\n", "\r\n"))
    sys.stdout.flush()
last, tick = None, 0
while True:
    try:
        with open(control) as fh:
            mode = fh.read().strip()
    except OSError:
        mode = "working"
    tick += 1
    if mode == "working":  # progress: a new line of text every tick, under a spinner
        draw("❯ do the task\n" + "".join(f"  wrote {w}.py\n" for w in words[:tick % 12 + 1]) +
             f"✻ Pondering… ({tick}s · esc to interrupt)\n")
    elif mode == "stalled":  # only the counter moves: output, but no progress
        draw(f"❯ do the task\n✻ Pondering… ({tick}s · esc to interrupt)\n")
    elif mode != last:  # idle and question are drawn once, then silence, like the real UI
        draw({"idle": "❯ do the task\n  Done.\n──────\n❯ \n──────\n  ? for shortcuts\n",
              "question": "Bash command\n  rm -rf build\nDo you want to proceed?\n❯ 1. Yes\n  2. No\n"}.get(mode, mode))
    last = mode
    time.sleep(0.5)
'''


def write_config(ctl: Controller, **providers: dict[str, Any]) -> Path:
    path = ctl.root / "config.yaml"
    path.write_text(yaml.safe_dump({"providers": providers}))
    return path


def agent_yaml(name: str, provider: str, *, env: dict[str, str], cwd: str, **spec: Any) -> str:
    body = {"apiVersion": "agentctl/v1", "kind": "Agent", "metadata": {"name": name},
            "spec": {"provider": provider, "supervisor": "tmux", "cwd": cwd, "env": env, **spec}}
    return yaml.safe_dump(body, sort_keys=False)


def inst(doc: dict[str, Any]) -> dict[str, Any]:
    instances: list[dict[str, Any]] = doc.get("instances") or [{}]
    return instances[0]


def wait_activity(ctl: Controller, name: str, activity: str, reason: str | None = None) -> dict[str, Any]:
    def ok(d: dict[str, Any]) -> bool:
        i = inst(d)
        return bool(i.get("pid")) and i.get("activity") == activity and reason in (None, i.get("activityReason"))
    return ctl.wait_status(name, ok, DEADLINE, f"{name} {activity} {reason or ''}")


def holds(pred: Callable[[], bool], seconds: float, message: str) -> None:
    """pred stays true for the whole duration (what must NOT happen, watched the whole time)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert pred(), message
        time.sleep(0.2)


def metric(ctl: Controller, name: str) -> dict[str, float]:
    status, body = ctl.http("/metrics")
    assert status == 200
    found = re.findall(rf'agentctl_agent_activity{{activity="(\w+)",agent="{name}"}} (\S+)', body.decode())
    return {a: float(v) for a, v in found}


def send_keys(ctl: Controller, session: str, *keys: str) -> None:
    ctx = Context(ctl.state, ctl.controller_id() or "")
    subprocess.run(["tmux", *tmux_adapter.socket_args(ctx), "send-keys", "-t", f"={session}:", *keys],
                   check=True, timeout=10, capture_output=True)


# -- a stand-in: every activity, deterministically ----------------------------------------------
def test_activity_follows_the_screen_and_logidle_spares_idle_and_waiting_sessions(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    script = ctl.root / "standin-claude"
    script.write_text(f"#!{sys.executable}\n{STANDIN}")
    script.chmod(0o755)
    control = ctl.root / "control"
    control.write_text("working")
    config = write_config(ctl, claude={"executable": str(script)})
    ctl.write("a.yaml", agent_yaml("sess", "claude", cwd=".", env={"STANDIN_CONTROL": str(control)},
                                   liveness={"logIdleSeconds": 5}))
    ctl.start("--config", str(config))

    doc = wait_activity(ctl, "sess", "Working")
    pid = inst(doc)["pid"]
    assert metric(ctl, "sess") == {"Working": 1, "Idle": 0, "WaitingForInput": 0, "Unknown": 0}

    control.write_text("idle")  # silent at its prompt: the old rule would restart it after 5 s
    since = inst(wait_activity(ctl, "sess", "Idle"))["activitySince"]
    holds(lambda: ctl.pids("sess") == [pid] and (ctl.status("sess") or {}).get("restarts") == 0, 12,
          "an Idle session was restarted by logIdleSeconds")
    assert inst(ctl.status("sess") or {})["activitySince"] == since  # unchanged while it stays Idle

    control.write_text("question")
    wait_activity(ctl, "sess", "WaitingForInput", "PermissionPrompt")
    wait_for(lambda: metric(ctl, "sess").get("WaitingForInput") == 1, DEADLINE, message="metric WaitingForInput")
    listed = ctl.cli("get", "sess", "-o", "json")
    assert '"activity": "WaitingForInput"' in listed.stdout
    assert "Activity: WaitingForInput (PermissionPrompt) since " in ctl.cli("describe", "sess").stdout
    holds(lambda: ctl.pids("sess") == [pid], 12, "a session waiting for a person was restarted by logIdleSeconds")

    # its counter ticks (output every 0.5 s) but nothing else moves: logIdle sees no progress
    control.write_text("stalled")
    doc = ctl.wait_status("sess", lambda d: d.get("restarts") == 1 and bool(ctl.pids("sess"))
                          and ctl.pids("sess") != [pid], DEADLINE, "restart of the stalled session")
    assert inst(doc)["lastExit"]["reason"] == "LivenessFailed"

    # logs: each screen it showed, in its last state; the stall's redraws (only the counter
    # moved, a clear on every tick) are one screen, not one per tick
    lines = ctl.cli("logs", "sess").stdout.splitlines()
    assert "Do you want to proceed?" in lines and "  ? for shortcuts" in lines
    stalled = [line for i, line in enumerate(lines) if "Pondering" in line and lines[i - 1] == "❯ do the task"]
    raw = ctl.cli("logs", "sess", "--raw").stdout
    assert len(stalled) == 1 and raw.count("Pondering") >= len(stalled) + 5, (stalled, raw.count("Pondering"))
    assert "\x1b" not in "\n".join(lines) and "\x1b[" in raw


def test_capture_of_an_exited_tmux_instance_shows_its_last_screen(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    draw = ("import sys, time\n"
            "sys.stdout.write('\\x1b[2J\\x1b[5;10Hlast words\\x1b[6;10H\\x1b[1mof the agent\\x1b[0m'); sys.stdout.flush()\n"
            "time.sleep(1)\nsys.exit(3)\n")
    ctl.apply("bye", [sys.executable, "-c", draw], supervisor="tmux", restartPolicy="Never")
    ctl.start()
    ctl.wait_phase("bye", "Failed", DEADLINE)
    shown = ctl.cli("capture", "bye")
    assert shown.returncode == 0, shown.stderr
    lines = [line.strip() for line in shown.stdout.splitlines()]
    assert "last words" in lines, shown.stdout  # where the agent drew it (tmux may scroll a line for its note)
    assert lines[lines.index("last words") + 1] == "of the agent"
    assert "\x1b" not in shown.stdout
    assert "\x1b[1m" in ctl.cli("capture", "bye", "--raw").stdout
    kept = ctl.state / "logs" / "bye-0.screen"
    assert kept.stat().st_mode & 0o777 == 0o600


# -- the real CLIs ------------------------------------------------------------------------------
def cli_env(ctl: Controller, home: Path) -> dict[str, str]:
    assert CLI_BIN is not None
    return {"HOME": str(home), "HTTPS_PROXY": REFUSED, "HTTP_PROXY": REFUSED,
            "PATH": f"{CLI_BIN}:{os.environ.get('PATH', os.defpath)}", "TERM": "xterm-256color"}


@pytest.mark.skipif(CLI_BIN is None, reason=NO_CLIS)
def test_real_claude_at_its_trust_prompt_waits_for_a_person_and_is_never_restarted(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    assert CLI_BIN is not None
    home = ctl.root / "home"
    home.mkdir()
    (home / ".claude.json").write_text('{"hasCompletedOnboarding": true}')  # straight to the folder's trust
    (ctl.root / "work").mkdir()
    config = write_config(ctl, claude={"executable": str(Path(CLI_BIN) / "claude")})
    ctl.write("a.yaml", agent_yaml("cl", "claude", cwd="work", env=cli_env(ctl, home),
                                   liveness={"logIdleSeconds": 5}, restartPolicy="Never"))
    ctl.start("--config", str(config))

    pid = inst(wait_activity(ctl, "cl", "WaitingForInput", "TrustPrompt"))["pid"]
    holds(lambda: ctl.pids("cl") == [pid] and (ctl.status("cl") or {}).get("restarts") == 0, HOLD,
          "claude waiting at its trust prompt was restarted")
    screen = ctl.cli("capture", "cl").stdout
    assert "Is this a project you created or one you trust?" in screen
    logs = ctl.cli("logs", "cl").stdout
    assert "Is this a project you created or one you trust?" in logs  # words, not glued together

    send_keys(ctl, "cl-0", "Enter")  # its default answer: "No, exit"
    ctl.wait_phase("cl", "Failed", DEADLINE)
    last = ctl.cli("capture", "cl")
    assert last.returncode == 0, last.stderr
    assert "Is this a project you created or one you trust?" in last.stdout


@pytest.mark.skipif(CLI_BIN is None, reason=NO_CLIS)
def test_real_codex_at_its_login_screen_waits_for_a_person_and_its_logs_are_screens(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    assert CLI_BIN is not None
    home = ctl.root / "home"
    (home / ".codex").mkdir(parents=True)
    # no background app-server daemon: it would leave the instance's session (setsid)
    (home / ".codex" / "config.toml").write_text("[features]\ndaemon_auto_start = false\n")
    (ctl.root / "work").mkdir()
    config = write_config(ctl, codex={"executable": str(Path(CLI_BIN) / "codex")})
    ctl.write("a.yaml", agent_yaml("cx", "codex", cwd="work", env=cli_env(ctl, home),
                                   liveness={"logIdleSeconds": 5}))
    ctl.start("--config", str(config))

    pid = inst(wait_activity(ctl, "cx", "WaitingForInput", "LoginPrompt"))["pid"]
    holds(lambda: ctl.pids("cx") == [pid] and (ctl.status("cx") or {}).get("restarts") == 0, HOLD,
          "codex waiting at its login screen was restarted")
    assert "Sign in with ChatGPT" in ctl.cli("capture", "cx").stdout
    logs = ctl.cli("logs", "cx").stdout.splitlines()
    raw = ctl.cli("logs", "cx", "--raw").stdout
    assert max(len(line) for line in raw.split("\n")) > 1000  # its full-screen UI is one long "line" of bytes
    assert max(len(line) for line in logs) <= 200  # ... and reads as screens of the pane's width
    assert any("Sign in with ChatGPT" in line for line in logs)
    assert metric(ctl, "cx")["WaitingForInput"] == 1


def test_logs_follow_of_a_tmux_instance_prints_lines_as_the_terminal_shows_them(
        ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    cleanup_supervisors(ctl)
    # each line is drawn word by word with cursor moves, as claude does
    ticker = ("import sys, time\n"
              "for n in range(600):\n"
              "    sys.stdout.write(f'\\x1b[2Gtick\\x1b[7G{n}\\x1b[12Gdone\\r\\n'); sys.stdout.flush(); time.sleep(0.2)\n")
    ctl.apply("tick", [sys.executable, "-c", ticker], supervisor="tmux")
    ctl.start()
    ctl.wait_phase("tick", "Running", DEADLINE)
    follow = subprocess.Popen([sys.executable, "-m", "controller", "logs", "tick", "-f", "--state-dir", str(ctl.state)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        seen: list[str] = []

        def later_tick() -> bool:
            assert follow.stdout is not None
            seen.append(follow.stdout.readline().rstrip("\n"))
            return seen[-1].startswith(" tick ") and int(seen[-1].split()[1]) >= 10

        wait_for(later_tick, DEADLINE, interval=0, message="a later tick through logs -f")
        ticks = [line for line in seen if line.strip()]
        assert all(re.fullmatch(r" tick \d+ +done", line) for line in ticks), ticks  # words apart, no escapes
        numbers = [int(line.split()[1]) for line in ticks]
        assert numbers == sorted(set(numbers)), numbers  # each line once, in order
    finally:
        os.killpg(follow.pid, 9)
        follow.wait(10)
        assert follow.stdout is not None
        follow.stdout.close()
