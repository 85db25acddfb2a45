"""Completion scripts, exercised in a real bash: commands, flags, flag values and agent names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from controller import cli

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def script(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["completion", shell]) == 0
    return capsys.readouterr().out


def complete(text: str, words: list[str], cwd: Path) -> list[str]:
    """Run the bash completion function as bash would for `words` (the last one being typed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    probe = f'{text}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _agentctl; printf "%s\\n" "${{COMPREPLY[@]}}"'
    done = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=30,
                          check=True)
    return [line for line in done.stdout.splitlines() if line]


def test_bash_completes_commands_flags_values_and_agent_names(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    text = script("bash", capsys)
    status = tmp_path / "st" / "status"
    status.mkdir(parents=True)
    for name in ("reviewer", "ticker"):
        (status / f"{name}.yaml").write_text(f"name: {name}\n")
    assert "suspend" in complete(text, ["agentctl", "su"], tmp_path)
    assert {"wait", "reconcile", "diff", "completion"} <= set(complete(text, ["agentctl", ""], tmp_path))
    assert {"--selector", "--watch", "--output", "--state-dir"} <= set(complete(text, ["agentctl", "get", "--"], tmp_path))
    assert complete(text, ["agentctl", "get", "-o", "w"], tmp_path) == ["wide"]
    assert complete(text, ["agentctl", "describe", "--state-dir", "st", "r"], tmp_path) == ["reviewer"]
    assert complete(text, ["agentctl", "logs", "--state-dir=st", ""], tmp_path) == ["reviewer", "ticker"]
    assert complete(text, ["agentctl", "describe", ""], tmp_path) == []  # ./.agentctl has no agents here


def test_zsh_and_fish_scripts_carry_the_same_commands(capsys: pytest.CaptureFixture[str]) -> None:
    zsh, fish = script("zsh", capsys), script("fish", capsys)
    assert zsh.startswith("#compdef agentctl") and "complete -F _agentctl agentctl" in zsh
    assert "__fish_use_subcommand -a 'run validate plan get describe logs" in fish
    assert "-l selector" in fish and "__agentctl_names" in fish


def test_bash_script_is_valid_bash(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "c.bash"
    path.write_text(script("bash", capsys))
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
