"""Claude Code and Codex presets end to end (CONTRACT §9): argv per mode, resumable sessions,
`restart --fresh`, the argv shown by describe and plan, and validation of provider values.

Stand-ins (a small Python script named `claude` or `codex` that records its argv and env)
cover every mode and field fast; the real CLIs (AGENTCTL_TEST_CLI_BIN) prove the preset argv
is accepted: their screen or events are their own not-logged-in/offline state, never a usage
error. Every process is ended at teardown by the fixtures (controller group, marked agents,
the controller's private tmux server).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import controller
from tests.e2e.test_supervisors import cleanup_supervisors, kill_tmux_server  # noqa: F401 - fixture
from tests.helpers import Controller, log_text, marked_pids, wait_for

DEADLINE = 60.0  # a shared 2-core box; real CLIs start in seconds there
ROOT = Path(__file__).resolve().parents[2]
CLI_BIN = os.environ.get("AGENTCTL_TEST_CLI_BIN", "")
OFFLINE = "http://127.0.0.1:9"  # nothing listens: the CLIs see a refused connection, never the internet

STANDIN = """\
#!{python}
# records its argv and env, then acts like the CLI it stands in for, as far as agentctl cares
import datetime, json, os, signal, sys, uuid
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.path.join({root!r}, os.environ["AGENTCTL_AGENT"] + ".calls"), "a") as fh:
    env = {{k: v for k, v in os.environ.items() if k.startswith("AGENTCTL_")}}
    fh.write(json.dumps({{"name": name, "argv": args, "env": env, "tty": os.isatty(0)}}) + "\\n")
if name == "claude" and os.environ.get("STANDIN_FORGETS") and "--resume" in args:
    # as claude when its first start could not record the conversation (e.g. it was offline)
    print("No conversation found with session ID: " + args[args.index("--resume") + 1], flush=True)
    sys.exit(1)
if name == "codex":
    tid = args[args.index("resume") + 1] if "resume" in args else str(uuid.uuid4())
    if args[:1] == ["exec"]:
        print(json.dumps({{"type": "thread.started", "thread_id": tid}}), flush=True)
    elif "resume" not in args:  # the TUI records its session as codex does
        now = datetime.datetime.now(datetime.timezone.utc)
        home = os.environ.get("CODEX_HOME") or os.path.join({root!r}, "codex-home")
        day = os.path.join(home, "sessions", now.strftime("%Y/%m/%d"))
        os.makedirs(day, exist_ok=True)
        meta = {{"type": "session_meta", "payload": {{"id": tid, "cwd": os.getcwd(),
                                                     "timestamp": now.isoformat().replace("+00:00", "Z")}}}}
        with open(os.path.join(day, "rollout-" + now.strftime("%Y-%m-%dT%H-%M-%S") + "-" + tid + ".jsonl"), "w") as fh:
            fh.write(json.dumps(meta) + "\\n")
print("standin up", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
"""


# -- fixtures and helpers ----------------------------------------------------------------
@pytest.fixture
def agents(ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> Iterator[Controller]:  # noqa: F811
    """A controller whose claude and codex presets run stand-ins (config `providers.*.executable`)."""
    yield with_standins(ctl, cleanup_supervisors)


def with_standins(ctl: Controller, cleanup: Callable[[Controller], None]) -> Controller:
    cleanup(ctl)
    bin_dir = ctl.root / "bin"
    bin_dir.mkdir()
    for name in ("claude", "codex"):
        path = bin_dir / name
        path.write_text(STANDIN.format(python=sys.executable, root=str(ctl.root)))
        path.chmod(0o755)
    config = ctl.root / "agentctl.yaml"
    config.write_text(yaml.safe_dump({"providers": {n: {"executable": str(bin_dir / n)} for n in ("claude", "codex")}}))
    ctl.config = config  # type: ignore[attr-defined]
    return ctl


def agent_doc(name: str, **spec: Any) -> str:
    return yaml.safe_dump({"apiVersion": "agentctl/v1", "kind": "Agent", "metadata": {"name": name}, "spec": spec},
                          sort_keys=False)


def apply(ctl: Controller, name: str, **spec: Any) -> None:
    ctl.write(f"{name}.yaml", agent_doc(name, **spec))


def calls(ctl: Controller, name: str) -> list[dict[str, Any]]:
    try:
        text = (ctl.root / f"{name}.calls").read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_calls(ctl: Controller, name: str, count: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        found = calls(ctl, name)
        return found if len(found) >= count else None
    try:
        return wait_for(enough, DEADLINE, message=f"{count} starts of {name}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ncontroller log:\n{ctl.log()[-3000:]}") from None


def start(ctl: Controller) -> Controller:
    return ctl.start("--config", str(ctl.config))  # type: ignore[attr-defined]


HOOKSTATE = Path(controller.__file__).resolve().parent / "hookstate.py"


def notify_of(ctl: Controller, instance: str) -> str:
    """The `-c notify=[...]` codex is given: the hook command writing the instance's activity."""
    state = ctl.state / "run" / f"{instance}.activity"
    return "notify=" + json.dumps([sys.executable, "-I", "-S", str(HOOKSTATE), str(state), "Idle"])


def restart(ctl: Controller, name: str, *flags: str) -> None:
    done = ctl.cli("restart", name, *flags)
    assert done.returncode == 0, done.stderr


def instance(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["instances"][0])


# -- argv per mode and field (stand-ins) ----------------------------------------------------
def test_headless_presets_run_under_process_with_every_field_and_the_prompt_after_dashes(agents: Controller) -> None:
    fields = {"model": "m1", "effort": "high", "prompt": "-starts with a dash", "providerArgs": ["--extra"]}
    apply(agents, "cl", provider="claude", approvalMode="acceptEdits", **fields)
    apply(agents, "cx", provider="codex", approvalMode="never", **fields)
    start(agents)
    (claude,) = wait_calls(agents, "cl", 1)
    (codex,) = wait_calls(agents, "cx", 1)
    assert claude["argv"] == ["-p", "--output-format", "stream-json", "--verbose", "--model", "m1", "--effort", "high",
                              "--permission-mode", "acceptEdits", "--extra", "--", "-starts with a dash"]
    assert codex["argv"] == ["exec", "--json", "--skip-git-repo-check", "-c", 'sandbox_mode="workspace-write"',
                             "-c", 'approval_policy="never"', "--model", "m1", "-c", "model_reasoning_effort=high",
                             "--extra", "--", "-starts with a dash"]
    assert claude["env"]["AGENTCTL_EFFORT"] == "high" and claude["env"]["AGENTCTL_APPROVAL_MODE"] == "acceptEdits"
    assert "AGENTCTL_SESSION_ID" not in claude["env"], "no session.resume: no session id"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_interactive_presets_run_on_a_terminal_under_tmux(agents: Controller) -> None:
    apply(agents, "cl", provider="claude", supervisor="tmux", model="m1", effort="low", approvalMode="plan",
          prompt="review")
    apply(agents, "cx", provider="codex", supervisor="tmux", model="m1", approvalMode="on-request", prompt="fix")
    start(agents)
    (claude,) = wait_calls(agents, "cl", 1)
    (codex,) = wait_calls(agents, "cx", 1)
    assert claude["tty"] and codex["tty"], "interactive mode runs the TUI on the pane's terminal"
    # with the activity hooks (CONTRACT §9): claude's per-instance settings, codex's notify program
    settings = str(agents.state / "run" / "cl-0.claude-settings.json")
    assert claude["argv"] == ["--model", "m1", "--effort", "low", "--permission-mode", "plan",
                              "--settings", settings, "--", "review"]
    assert codex["argv"] == ["--no-daemon", "--model", "m1", "--ask-for-approval", "on-request",
                             "-c", notify_of(agents, "cx-0"), "--", "fix"]


def test_describe_shows_the_command_and_plan_the_argv_of_each_start(agents: Controller) -> None:
    apply(agents, "cl", provider="claude", model="m1", prompt="two words")
    flags = ["--manifests", str(agents.manifests), "--base-dir", str(agents.base), "--config", str(agents.config)]  # type: ignore[attr-defined]
    plan = agents.cli("plan", *flags)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    exe = agents.root / "bin" / "claude"
    assert lines[0] == "create cl-0 Created", lines
    assert lines[1] == (f"    argv: {exe} -p --output-format stream-json --verbose --model m1 -- 'two words'"), lines
    start(agents)
    wait_calls(agents, "cl", 1)
    agents.wait_phase("cl", "Running", DEADLINE)
    out = agents.cli("describe", "cl").stdout
    assert f"Command:        {exe} -p --output-format stream-json --verbose --model m1 -- 'two words'" in out, out


# -- resumable sessions (stand-ins) -----------------------------------------------------------
def test_claude_session_is_named_on_the_first_start_resumed_later_and_fresh_on_request(agents: Controller) -> None:
    apply(agents, "cl", provider="claude", prompt="go", session={"resume": True})
    start(agents)
    first = wait_calls(agents, "cl", 1)[0]
    sid = first["env"]["AGENTCTL_SESSION_ID"]
    assert first["argv"][first["argv"].index("--session-id") + 1] == sid and "--resume" not in first["argv"]
    doc = agents.wait_status("cl", lambda d: instance(d).get("sessionId") == sid, DEADLINE, "sessionId in status")
    assert doc["phase"] == "Running"
    restart(agents, "cl")
    second = wait_calls(agents, "cl", 2)[1]
    assert second["argv"][second["argv"].index("--resume") + 1] == sid and "--session-id" not in second["argv"]
    assert second["env"]["AGENTCTL_SESSION_ID"] == sid
    restart(agents, "cl", "--fresh")
    third = wait_calls(agents, "cl", 3)[2]
    new = third["env"]["AGENTCTL_SESSION_ID"]
    assert new != sid and third["argv"][third["argv"].index("--session-id") + 1] == new
    agents.wait_status("cl", lambda d: instance(d).get("sessionId") == new, DEADLINE, "new sessionId in status")


def test_claude_names_its_session_again_when_it_says_the_conversation_does_not_exist(agents: Controller) -> None:
    apply(agents, "cl", provider="claude", prompt="go", session={"resume": True}, env={"STANDIN_FORGETS": "1"},
          backoff={"initialSeconds": 0.1})
    start(agents)
    sid = wait_calls(agents, "cl", 1)[0]["env"]["AGENTCTL_SESSION_ID"]
    restart(agents, "cl")
    refused, again = wait_calls(agents, "cl", 3)[1:3]
    assert refused["argv"][refused["argv"].index("--resume") + 1] == sid
    assert again["argv"][again["argv"].index("--session-id") + 1] == sid, "the same id, named again"
    assert again["env"]["AGENTCTL_SESSION_ID"] == sid


def test_session_survives_a_controller_restart_and_a_spec_change(agents: Controller) -> None:
    apply(agents, "cl", provider="claude", prompt="go", session={"resume": True})
    start(agents)
    sid = wait_calls(agents, "cl", 1)[0]["env"]["AGENTCTL_SESSION_ID"]
    agents.wait_status("cl", lambda d: instance(d).get("sessionId") == sid, DEADLINE)
    assert agents.stop() == 0
    apply(agents, "cl", provider="claude", prompt="go", model="m2", session={"resume": True})
    flags = ["--manifests", str(agents.manifests), "--base-dir", str(agents.base), "--config", str(agents.config)]  # type: ignore[attr-defined]
    lines = agents.cli("plan", *flags).stdout.splitlines()
    at = lines.index("restart cl-0 SpecChanged")
    assert lines[at + 1].startswith("    argv: ") and f"--resume {sid}" in lines[at + 1], lines
    start(agents)
    second = wait_calls(agents, "cl", 2)[1]
    assert second["argv"][:3] == ["-p", "--output-format", "stream-json"]
    assert second["argv"][second["argv"].index("--resume") + 1] == sid and "m2" in second["argv"]


def test_codex_headless_resumes_the_thread_it_announced(agents: Controller) -> None:
    apply(agents, "cx", provider="codex", prompt="go", session={"resume": True})
    start(agents)
    first = wait_calls(agents, "cx", 1)[0]
    assert "resume" not in first["argv"]
    wait_for(lambda: "thread.started" in log_text(agents, "cx-0"), DEADLINE, message="thread id in the log")
    thread = json.loads(next(line for line in log_text(agents, "cx-0").splitlines() if "thread.started" in line))
    restart(agents, "cx")
    second = wait_calls(agents, "cx", 2)[1]
    assert second["argv"][:4] == ["exec", "resume", thread["thread_id"], "--json"]
    assert second["env"]["AGENTCTL_SESSION_ID"] == first["env"]["AGENTCTL_SESSION_ID"]
    restart(agents, "cx", "--fresh")
    third = wait_calls(agents, "cx", 3)[2]
    assert "resume" not in third["argv"] and third["env"]["AGENTCTL_SESSION_ID"] != first["env"]["AGENTCTL_SESSION_ID"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_codex_interactive_resumes_the_session_it_recorded(agents: Controller) -> None:
    apply(agents, "cx", provider="codex", supervisor="tmux", session={"resume": True},
          env={"CODEX_HOME": str(agents.root / "codex-home")})
    start(agents)
    first = wait_calls(agents, "cx", 1)[0]
    assert first["argv"] == ["--no-daemon", "-c", notify_of(agents, "cx-0")]
    rollouts = wait_for(lambda: list((agents.root / "codex-home" / "sessions").glob("*/*/*/rollout-*.jsonl")),
                        DEADLINE, message="the stand-in's session file")
    recorded = json.loads(rollouts[0].read_text().splitlines()[0])["payload"]["id"]
    restart(agents, "cx")
    second = wait_calls(agents, "cx", 2)[1]
    assert second["argv"] == ["resume", recorded, "--no-daemon", "-c", notify_of(agents, "cx-0")]


# -- validation -------------------------------------------------------------------------------
def test_validate_names_file_and_line_of_values_the_provider_refuses(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        apiVersion: agentctl/v1
        kind: Agent
        metadata: {name: cx}
        spec:
          provider: codex
          prompt: go
          approvalMode: untrusted
          effort: max
        ---
        apiVersion: agentctl/v1
        kind: Agent
        metadata: {name: cl}
        spec:
          provider: claude
          supervisor: process
          mode: interactive
        """))
    done = Controller(tmp_path).cli("validate", str(bad), "--base-dir", str(tmp_path))
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert any(line.startswith(f"{bad}:7: spec.approvalMode: 'untrusted'") for line in lines), lines
    assert any(line.startswith(f"{bad}:8: spec.effort: 'max'") for line in lines), lines
    assert any(line.startswith(f"{bad}:16: spec.mode: interactive mode needs a terminal") for line in lines), lines


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_providers_example_runs_as_written(controller_factory: Callable[..., Controller],
                                               cleanup_supervisors: Callable[[Controller], None]) -> None:  # noqa: F811
    """Its manifests unchanged, on the repository root as base dir (as the examples say); only the
    executables are stand-ins."""
    ctl = with_standins(controller_factory(base=ROOT), cleanup_supervisors)
    docs = list(yaml.safe_load_all((ROOT / "examples" / "agents" / "providers.yaml").read_text()))
    shutil.copy(ROOT / "examples" / "agents" / "providers.yaml", ctl.manifests / "providers.yaml")
    start(ctl)
    for doc in docs:
        name, spec = doc["metadata"]["name"], doc["spec"]
        (call,) = wait_calls(ctl, name, 1)
        ctl.wait_phase(name, "Running", DEADLINE)
        interactive = spec.get("supervisor") == "tmux"
        assert call["tty"] == interactive, (name, call)
        if spec.get("prompt"):
            assert call["argv"][-2:] == ["--", spec["prompt"]], (name, call)


# -- the real CLIs ---------------------------------------------------------------------------
real = pytest.mark.skipif(not CLI_BIN, reason="AGENTCTL_TEST_CLI_BIN is not set (.ci/run installs the real CLIs)")


@pytest.fixture
def real_agents(ctl: Controller, cleanup_supervisors: Callable[[Controller], None]) -> Iterator[Controller]:  # noqa: F811
    cleanup_supervisors(ctl)
    config = ctl.root / "agentctl.yaml"
    config.write_text(yaml.safe_dump({
        "providers": {n: {"executable": str(Path(CLI_BIN) / n)} for n in ("claude", "codex")},
        # a private HOME: no login, no trust, nothing of the machine's user; no network
        "env": {"HOME": str(ctl.root / "home"), "HTTPS_PROXY": OFFLINE, "HTTP_PROXY": OFFLINE,
                "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    }))
    (ctl.root / "home").mkdir()
    (ctl.root / "work").mkdir()
    ctl.config = config  # type: ignore[attr-defined]
    yield ctl


def real_apply(ctl: Controller, name: str, **spec: Any) -> None:
    ctl.write(f"{name}.yaml", agent_doc(name, cwd="work", **spec))


def json_events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "type" in event:
            out.append(event)
    return out


def cli_version(provider: str, home: Path) -> str:
    """The installed CLI's version (x.y.z), as `--version` prints it."""
    done = subprocess.run([str(Path(CLI_BIN) / provider), "--version"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(home)}, check=False)
    found = re.search(r"\d+\.\d+\.\d+", done.stdout)
    assert found, done
    return found.group(0)


@real
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("provider", ["claude", "codex"])
def test_real_cli_accepts_the_interactive_preset_under_tmux(real_agents: Controller, provider: str) -> None:
    approval = {"claude": "acceptEdits", "codex": "on-request"}[provider]
    effort = {"claude": "high", "codex": "medium"}[provider]
    version = cli_version(provider, real_agents.root / "home")
    real_apply(real_agents, "ai", provider=provider, supervisor="tmux", model="m-test", effort=effort,
               approvalMode=approval, prompt="-a prompt that starts with a dash", session={"resume": True})
    start(real_agents)
    real_agents.wait_status("ai", lambda d: bool(d["instances"]), DEADLINE)

    seen: list[str] = []

    def screen() -> bool:
        done = real_agents.cli("capture", "ai")
        seen.append(done.stdout + done.stderr)
        return (done.returncode == 0 and version in done.stdout) or version in log_text(real_agents, "ai-0")
    # its own UI (banner with its version) came up, on the screen or in the terminal output it
    # logged: a usage error prints only the error, then exits. What follows is its own state:
    # offline, not logged in, trust (claude exits by itself when offline, and is restarted).
    try:
        wait_for(screen, DEADLINE, interval=0.5, message=f"{provider} {version}'s own screen")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nscreens seen: {seen[-3:]}\nlog: {log_text(real_agents, 'ai-0')[-2000:]}") from None
    if provider == "codex":  # --no-daemon: nothing of it leaves the instance's process group
        pid = instance(real_agents.wait_phase("ai", "Running", DEADLINE))["pid"]
        escaped = [p for p in marked_pids(real_agents.controller_id() or "?") if group_of(p) not in (None, pid)]
        assert escaped == [], [(p, Path(f"/proc/{p}/cmdline").read_bytes()[:200]) for p in escaped]


def group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@real
def test_real_claude_accepts_the_headless_preset_and_resumes_its_session(real_agents: Controller) -> None:
    real_apply(real_agents, "cl", provider="claude", model="sonnet", effort="low", approvalMode="acceptEdits",
               prompt="-hello", session={"resume": True}, restartPolicy="Never")
    start(real_agents)
    doc = real_agents.wait_status("cl", lambda d: d["phase"] in ("Failed", "Completed"), DEADLINE)
    sid = instance(doc)["sessionId"]
    events = json_events(log_text(real_agents, "cl-0"))
    # stream-json events prove the argv was accepted; the failure is its own (not logged in, offline)
    assert any(e["type"] == "result" and e.get("session_id") == sid for e in events), events[-3:]
    restart(real_agents, "cl")
    real_agents.wait_status("cl", lambda d: d["restarts"] >= 1 and d["phase"] in ("Failed", "Completed"), DEADLINE)
    later = json_events(log_text(real_agents, "cl-0"))[len(events):]
    assert any(e["type"] == "result" and e.get("session_id") == sid for e in later), later[-3:]


@real
def test_real_codex_accepts_the_headless_preset_and_resumes_its_thread(real_agents: Controller) -> None:
    real_apply(real_agents, "cx", provider="codex", model="m-test", effort="low", prompt="-hello",
               session={"resume": True})
    start(real_agents)

    def thread_ids() -> list[str]:
        return [e["thread_id"] for e in json_events(log_text(real_agents, "cx-0")) if e["type"] == "thread.started"]
    first = wait_for(thread_ids, DEADLINE, interval=0.2, message="codex's thread.started event")[0]
    restart(real_agents, "cx")
    ids = wait_for(lambda: (lambda t: t if len(t) >= 2 else None)(thread_ids()), DEADLINE, interval=0.2,
                   message="a second run's thread.started event")
    assert ids[1] == first, "the restart resumed the same thread"


# -- memory: PSS of the tree ------------------------------------------------------------------
SHARER = """
import mmap, os, sys, time
size = 64 << 20
shared = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
shared.write(b"x" * size)  # touched once: every process below maps the same 64 MiB
children = []
for _ in range(3):
    r, w = os.pipe()
    if os.fork() == 0:
        touched = sum(shared[i] for i in range(0, size, 4096))  # every page into this process's RSS
        os.write(w, b"%d" % touched)
        while True:
            time.sleep(1)
    children.append(r)
for r in children:
    os.read(r, 32)  # each child has touched all of it
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(1)
"""
HOG = """
import os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
held = []
while True:
    held.append(b"y" * (20 << 20))
    time.sleep(0.1)
"""


def test_memory_limit_charges_shared_pages_once_not_once_per_process(ctl: Controller) -> None:
    """Four processes mapping the same 64 MiB: ~4x64 MiB of RSS, ~64 MiB of PSS. A limit of 160 MiB
    stops only the agent whose memory is really its own (both are sampled in the same rounds)."""
    ready = ctl.root / "sharer.ready"
    ctl.write("sharer.yaml", agent_doc("sharer", command=[sys.executable, "-c", SHARER, str(ready)],
                                       resources={"memoryLimitMiB": 160}))
    ctl.write("hog.yaml", agent_doc("hog", command=[sys.executable, "-c", HOG, str(ready)],
                                    resources={"memoryLimitMiB": 160}, backoff={"initialSeconds": 30}))
    ctl.start()
    wait_for(ready.exists, DEADLINE, message="the sharer's processes all mapped the shared memory")
    hog = ctl.wait_status("hog", lambda d: (instance(d).get("lastExit") or {}).get("reason") == "MemoryLimitExceeded",
                          DEADLINE, "the hog stopped for memory")
    assert "over the limit of 160 MiB" in instance(hog)["lastExit"]["message"]
    sharer = ctl.status("sharer") or {}
    assert sharer["phase"] == "Running" and sharer["restarts"] == 0, sharer


@real
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_real_codex_interactive_resumes_the_session_it_recorded(real_agents: Controller) -> None:
    home = real_agents.root / "home"
    # a made-up API key stored locally: past the login screen, the TUI sends the prompt (refused:
    # offline) and records its session, as it would for a real user
    login = subprocess.run([str(Path(CLI_BIN) / "codex"), "login", "--with-api-key"], input="sk-made-up\n",
                           capture_output=True, text=True, timeout=60, cwd=real_agents.root / "work", check=False,
                           env={**os.environ, "HOME": str(home), "HTTPS_PROXY": OFFLINE})
    assert login.returncode == 0, login.stderr
    real_apply(real_agents, "cx", provider="codex", supervisor="tmux", prompt="-hello", session={"resume": True})
    start(real_agents)
    sessions = real_agents.root / "home" / ".codex" / "sessions"
    rollouts = wait_for(lambda: sorted(sessions.glob("*/*/*/rollout-*.jsonl")), DEADLINE, interval=0.2,
                        message="codex's session file")
    recorded = json.loads(rollouts[0].read_text().splitlines()[0])["payload"]["id"]
    restart(real_agents, "cx")
    described = wait_for(lambda: (lambda out: out if f" resume {recorded} " in out else "")(
        real_agents.cli("describe", "cx").stdout), DEADLINE, interval=0.5, message="the restart resuming it")
    assert "Command:" in described
    # the resumed TUI runs (a refused id would have ended it): its own screen, same session
    version = cli_version("codex", real_agents.root / "home")
    wait_for(lambda: version in real_agents.cli("capture", "cx").stdout, DEADLINE, interval=0.5,
             message="codex's screen after resuming")
    assert sorted(sessions.glob("*/*/*/rollout-*.jsonl"))[0] == rollouts[0]
