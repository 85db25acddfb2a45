"""Every shipped manifest and config passes `agentctl validate`, as a user would run it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "agents").glob("*.yaml"))


def agentctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_manifest_is_valid(path: Path) -> None:
    # from the repository root, as the README says: the examples' paths are relative to it
    result = agentctl("validate", str(path), "--config", "examples/agentctl-config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_examples_cover_every_supervisor_and_policy_field() -> None:
    text = "\n".join(p.read_text() for p in EXAMPLES)
    for field in ("supervisor: tmux", "supervisor: systemd", "restartPolicy: Never", "restartPolicy: OnFailure",
                  "maxRestarts", "logIdleSeconds", "exec:", "httpGet", "memoryLimitMiB", "suspend", "replicas",
                  "envFiles", "provider: claude", "provider: codex", "placement", "logs:", "stop:"):
        assert field in text, f"no example shows {field}"


def test_the_examples_directory_validates_from_the_repository_root() -> None:
    result = agentctl("validate", "examples/agents/", "--config", "examples/agentctl-config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_sample_manifests_of_the_readme_are_valid() -> None:
    result = agentctl("validate")
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_invalid_example_edit_is_reported_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples/agents/basic.yaml").read_text().replace("command:", "comand:"))
    result = agentctl("validate", str(bad))
    assert result.returncode == 1
    assert f"{bad}:9: spec.comand: Extra inputs are not permitted" in result.stdout


def test_runtime_dependencies_are_the_five_plus_the_terminal_emulator() -> None:
    """CONTRACT §1: the five, and one library for terminal rendering (§9); etcd only as an extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"])
    assert names == ["prometheus-client", "psutil", "pydantic", "pyte", "pyyaml", "watchfiles"]
    assert "fleet" in project["optional-dependencies"]
