"""The controller config file (`agentctl run --config FILE`) and provider presets, end to end.

The config holds every run flag's default, a default env, the base dir and provider presets;
command-line flags override it. Presets are run against a stand-in executable (a tiny Python
script written here) that records its argv and env to a JSON file and then idles.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import PY, Controller, log_text, py, wait_for

DEADLINE = 30.0  # a noisy shared 2-core box: generous, never relied on for speed


# -- helpers ----------------------------------------------------------------------------
def write_config(ctl: Controller, name: str = "agentctl.yaml", **keys: Any) -> Path:
    """A config beside (never inside) the manifests dir; absolute paths, ephemeral port."""
    cfg = {"manifests": str(ctl.manifests), "stateDir": str(ctl.state), "baseDir": str(ctl.base),
           "metricsAddr": "127.0.0.1:0", "resync": 5, **keys}
    path = ctl.root / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_with_config(ctl: Controller, config: Path, *flags: str) -> Controller:
    """`agentctl run --config FILE [flags]`: no --manifests/--state-dir/... unless given in flags."""
    ctl.args = lambda *extra: [PY, "-m", "controller", "run", "--config", str(config), *flags, *extra]  # type: ignore[method-assign]
    return ctl.start()


def env_printer(*keys: str) -> list[str]:
    return py(f"""
        import os, time
        for key in {list(keys)!r}:
            print(f"{{key}}={{os.environ.get(key, '<missing>')}}", flush=True)
        print("env-done", flush=True)
        while True: time.sleep(1)
    """)


def running(ctl: Controller, name: str) -> dict[str, Any]:
    return ctl.wait_status(name, lambda d: d.get("phase") == "Running", DEADLINE, f"{name} Running")


def stand_in(directory: Path, name: str, records: Path) -> Path:
    """An executable that records argv and env to records/<AGENTCTL_INSTANCE>.json, then idles."""
    path = directory / name
    path.write_text(f"""#!{PY}
import json, os, sys, time
out = os.path.join({str(records)!r}, os.environ.get("AGENTCTL_INSTANCE", "unknown") + ".json")
with open(out + ".tmp", "w") as fh:
    json.dump({{"argv0": sys.argv[0], "args": sys.argv[1:], "env": dict(os.environ)}}, fh)
os.replace(out + ".tmp", out)
while True:
    time.sleep(1)
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def record(records: Path, instance: str) -> dict[str, Any]:
    def read() -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = json.loads((records / f"{instance}.json").read_text())
            return found
        except (OSError, ValueError):
            return None
    found = wait_for(read, DEADLINE, message=f"the stand-in's record of {instance}")
    assert found is not None
    return found


def mybot_preset(executable: Path) -> dict[str, Any]:
    return {"executable": str(executable), "args": ["--model", "{model}", "--prompt", "{prompt}"],
            "env": {"MYBOT_HEADLESS": "1"}}


# -- the config file supplies the run defaults ---------------------------------------------
def test_config_file_supplies_every_run_default(ctl: Controller) -> None:
    ctl.apply("first", env_printer("SHARED"), placement={"hosts": ["cfg-host"]})
    ctl.apply("second", env_printer("SHARED"))
    ctl.apply("elsewhere", env_printer("SHARED"), placement={"hosts": ["other-host"]})
    config = write_config(ctl, maxAgents=1, hostName="cfg-host", env={"SHARED": "from-config"},
                          providers={"mybot": mybot_preset(Path("/bin/true"))})
    start_with_config(ctl, config)

    assert ctl.port not in (0, 9478), "metricsAddr 127.0.0.1:0 from the config: an ephemeral port"
    assert (ctl.state / "state.db").exists(), "stateDir from the config"
    assert not (ctl.root / ".agentctl").exists(), "the default ./.agentctl was used"

    def capped() -> list[dict[str, Any]] | None:
        docs = [ctl.status("first"), ctl.status("second")]
        if any(d is None for d in docs):
            return None
        phases = sorted(d["phase"] for d in docs if d is not None)
        return [d for d in docs if d is not None] if phases == ["Pending", "Running"] else None
    docs = wait_for(capped, DEADLINE, message="maxAgents 1: one Running, one Pending")
    assert docs is not None
    pending = next(d for d in docs if d["phase"] == "Pending")
    runs = next(d for d in docs if d["phase"] == "Running")
    assert next(c for c in pending["conditions"] if c["type"] == "Ready")["reason"] == "HostCapacity"
    assert ctl.status("elsewhere") is None, "hostName cfg-host: an agent placed on other-host gets no status"

    wait_for(lambda: "env-done" in log_text(ctl, f"{runs['name']}-0"), DEADLINE, message="env printed")
    assert "SHARED=from-config" in log_text(ctl, f"{runs['name']}-0").splitlines()

    plan = ctl.cli("plan", "--config", str(config))
    assert plan.returncode == 0, plan.stderr
    assert "noop elsewhere NotPlaced" in plan.stdout.splitlines(), plan.stdout


def test_command_line_flags_override_the_config_file(ctl: Controller) -> None:
    ctl.apply("one", env_printer("SHARED"))
    ctl.apply("two", env_printer("SHARED"))
    config_state = ctl.root / "config-state"
    config = write_config(ctl, stateDir=str(config_state), maxAgents=1, env={"SHARED": "from-config"})
    start_with_config(ctl, config, "--state-dir", str(ctl.state), "--max-agents", "2")
    running(ctl, "one")
    running(ctl, "two")  # --max-agents 2 over maxAgents: 1
    assert (ctl.state / "state.db").exists()
    assert not config_state.exists(), "--state-dir overrides stateDir: the config's dir is never created"


def test_config_accepts_every_run_flag_under_its_camel_case_name(ctl: Controller) -> None:
    ctl.apply("gpu", env_printer("SHARED"), placement={"hostLabels": {"gpu": "true"}})
    config = write_config(ctl, maxAgents=5, logFormat="json", stopAgentsOnExit=False, hostName="cfg-host",
                          hostLabels={"gpu": "true"}, allowInsecureManifests=False, env={"SHARED": "x"},
                          providers={"mybot": mybot_preset(Path("/bin/true"))})
    once = ctl.cli("run", "--once", "--config", str(config), timeout=60)
    assert once.returncode == 0, once.stderr
    lines = [line for line in once.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["msg"] for line in lines), "logFormat: json"
    assert ctl.status("gpu") is not None, "hostLabels gpu=true from the config: the agent is placed here"
    again = ctl.cli("run", "--once", "--config", str(config), "--log-format", "text", timeout=60)
    assert again.returncode == 0, again.stderr
    assert not any(line.startswith("{") for line in again.stderr.splitlines()), "--log-format overrides logFormat"


BAD_CONFIGS = [
    pytest.param("colour: blue\n", "colour", id="unknown key"),
    pytest.param("providers:\n  mybot:\n    executable: /bin/true\n    flags: [-x]\n", "flags",
                 id="unknown provider key"),
    pytest.param("maxAgents: many\n", "maxAgents", id="wrong type"),
    pytest.param("manifests: [unclosed\nstateDir: x\n", "YAML", id="invalid YAML"),
    pytest.param("- a\n- b\n", "dictionary", id="not a mapping"),
    pytest.param(None, "cannot read", id="missing file"),
    pytest.param("env:\n  1BAD: x\n", "1BAD", id="bad default env name"),
    pytest.param('providers:\n  mybot:\n    executable: /bin/true\n    env: {"A=B": "1"}\n', "A=B",
                 id="bad provider env name"),
    pytest.param('env: {X: "a\\0b"}\n', "X", id="NUL in default env"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_CONFIGS)
def test_bad_config_file_exits_2_naming_the_file(ctl: Controller, text: str | None, needle: str) -> None:
    config = ctl.root / "bad-config.yaml"
    if text is not None:
        config.write_text(text)
    # validate first: it never runs anything, so a config wrongly accepted fails fast here
    for command in (["validate", str(ctl.manifests)], ["plan", "--manifests", str(ctl.manifests)],
                    ["run", "--manifests", str(ctl.manifests)]):
        result = ctl.cli(*command, "--config", str(config), timeout=30)
        assert result.returncode == 2, (command, result.returncode, result.stdout, result.stderr)
        assert str(config) in result.stderr and needle in result.stderr, result.stderr
    assert not ctl.state.exists(), "a bad config touches nothing"


# -- provider presets against a stand-in -------------------------------------------------
def test_provider_presets_from_the_config_build_argv_and_env(ctl: Controller) -> None:
    records = ctl.root / "records"
    records.mkdir()
    tools = ctl.root / "tools"
    tools.mkdir()
    mybot = stand_in(tools, "mybot", records)
    fake_claude = stand_in(tools, "fake-claude", records)
    alt = stand_in(tools, "alt-bot", records)
    config = write_config(
        ctl, env={"SHARED": "from-config", "OVERRIDE_ME": "from-config"},
        providers={"mybot": mybot_preset(mybot), "claude": {"executable": str(fake_claude)}},
    )
    ctl.apply("bot", None, provider="mybot", model="m1", env={"OVERRIDE_ME": "from-manifest"})
    ctl.apply("claudey", None, provider="claude", model="X", approvalMode="plan", prompt="fix the bug")
    ctl.apply("custom", [str(alt)], provider="mybot", model="m2", prompt="p q",
              providerArgs=["--verbose", "--", "x y"], tags=["a", "b"], capabilities=["c1", "c2"])
    # helpers.manifest() fills in a default command: a provider agent has none unless it says so
    for name in ("bot", "claudey"):
        doc = yaml.safe_load((ctl.manifests / f"{name}.yaml").read_text())
        del doc["spec"]["command"]
        ctl.write(f"{name}.yaml", yaml.safe_dump(doc, sort_keys=False))
    start_with_config(ctl, config)

    bot = record(records, "bot-0")
    assert bot["argv0"] == str(mybot)
    assert bot["args"] == ["--model", "m1"], "the empty prompt is dropped with its flag"
    assert bot["env"]["MYBOT_HEADLESS"] == "1"
    assert bot["env"]["AGENTCTL_MODEL"] == "m1"
    assert "AGENTCTL_PROMPT" not in bot["env"]
    assert bot["env"]["SHARED"] == "from-config"
    assert bot["env"]["OVERRIDE_ME"] == "from-manifest", "a manifest's env overrides the config's default env"

    claudey = record(records, "claudey-0")
    assert claudey["argv0"] == str(fake_claude), "the config's claude executable"
    # the built-in claude flags, headless (print mode) under the process supervisor (CONTRACT §9)
    assert claudey["args"] == ["-p", "--output-format", "stream-json", "--verbose", "--model", "X",
                               "--permission-mode", "plan", "--", "fix the bug"], "the built-in claude flags"
    assert claudey["env"]["AGENTCTL_PROMPT"] == "fix the bug"
    assert claudey["env"]["AGENTCTL_APPROVAL_MODE"] == "plan"
    assert claudey["env"]["OVERRIDE_ME"] == "from-config"
    assert "MYBOT_HEADLESS" not in claudey["env"]

    custom = record(records, "custom-0")
    assert custom["argv0"] == str(alt), "spec.command replaces the preset's executable"
    assert custom["args"] == ["--model", "m2", "--prompt", "p q", "--verbose", "--", "x y"], "providerArgs appended"
    assert custom["env"]["MYBOT_HEADLESS"] == "1"
    assert custom["env"]["AGENTCTL_TAGS"] == "a,b"
    assert custom["env"]["AGENTCTL_CAPABILITIES"] == "c1,c2"
    assert custom["env"]["AGENTCTL_MODEL"] == "m2" and custom["env"]["AGENTCTL_PROMPT"] == "p q"

    for name in ("bot", "claudey", "custom"):
        doc = running(ctl, name)
        assert doc["restarts"] == 0


MYBOT_MANIFEST = """\
apiVersion: agentctl/v1
kind: Agent
metadata:
  name: {name}
spec:
  provider: {provider}
  model: m1
"""


def test_validate_with_config_knows_its_providers(ctl: Controller) -> None:
    config = write_config(ctl, providers={"mybot": mybot_preset(Path("/bin/true"))})
    good = ctl.write("good.yaml", MYBOT_MANIFEST.format(name="good", provider="mybot"))
    bad = ctl.write("bad.yaml", MYBOT_MANIFEST.format(name="bad", provider="nobot"))

    ok = ctl.cli("validate", str(good), "--config", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    without = ctl.cli("validate", str(good))
    assert without.returncode == 1 and "mybot" in without.stdout, "mybot exists only in the config"

    rejected = ctl.cli("validate", str(bad), "--config", str(config))
    assert rejected.returncode == 1
    assert re.search(rf"^{re.escape(str(bad))}:6: .*nobot", rejected.stdout, re.MULTILINE), rejected.stdout
    assert "mybot" in rejected.stdout, "the known providers include the config's"

    # no path: the config's manifests dir
    whole = ctl.cli("validate", "--config", str(config))
    assert whole.returncode == 1
    errors = [line for line in whole.stdout.splitlines() if line.strip()]
    assert len(errors) == 1 and re.match(r"^\S*bad\.yaml:6: .*nobot", errors[0]), whole.stdout
    assert os.path.realpath(errors[0].split(":", 1)[0]) == os.path.realpath(bad)
