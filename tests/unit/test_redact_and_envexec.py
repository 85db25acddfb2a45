"""Redaction of env values from log tails, and the env wrapper's file format and argv (no process)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from controller import envexec, redact
from controller.model import InstanceSpec


def test_every_long_enough_value_is_masked_and_markers_are_not() -> None:
    env = {"PASSWORD": "hunter22", "LEVEL": "dbg", "AGENTCTL_INSTANCE": "reviewer-0", "TOKEN": "abcd"}
    values = redact.secret_values(env)
    assert values == ("hunter22", "abcd")
    lines = redact.redact_lines(["pw=hunter22 lvl=dbg on reviewer-0", "abcdabcd"], values)
    assert lines == ("pw=[REDACTED] lvl=dbg on reviewer-0", "[REDACTED][REDACTED]")


def test_a_value_inside_another_is_hidden_whole_and_the_mask_is_never_matched_again() -> None:
    values = redact.secret_values({"A": "secret", "B": "my-secret-key", "C": "DACT"})
    assert redact.redact_lines(["my-secret-key secret DACT"], values) == ("[REDACTED] [REDACTED] [REDACTED]",)


def test_regex_characters_in_values_are_literal() -> None:
    values = redact.secret_values({"A": "a.b*c(d"})
    assert redact.redact_lines(["a.b*c(d axbbc(d"], values) == ("[REDACTED] axbbc(d",)


def test_no_values_leaves_lines_as_they_are() -> None:
    assert redact.redact_lines(["x"], ()) == ("x",)
    assert redact.redact_text("a\nb", ("zzzz",)) == "a\nb"


def test_instance_secrets_come_from_the_instance_env() -> None:
    spec = InstanceSpec("a-0", "a", 0, "process", ("x",), (("K", "value1"), ("AGENTCTL_RUN", "abcdef")), "/", "h")
    assert redact.instance_secrets((spec,), 0) == ("value1",)
    assert redact.instance_secrets((spec,), 3) == ()


def test_manifest_secrets_read_the_stored_spec_env() -> None:
    assert redact.manifest_secrets({"spec": {"env": {"K": "value1", "N": 12345}}}) == ("value1", "12345")
    assert redact.manifest_secrets(None) == ()
    assert redact.manifest_secrets({"spec": {}}) == ()


@pytest.mark.parametrize("value", ["", "plain", "a=b=c", "new\nline", "quote'\"$HOME", "ünïcødé", "\\x00-like"])
def test_env_file_round_trips_any_value(value: str) -> None:
    assert envexec.decode_env(envexec.encode_env({"K": value, "L": "x"})) == {"K": value, "L": "x"}


def test_env_file_is_private_and_unique(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    first = envexec.write_env_file(str(directory), "a-0", {"K": "v"})
    second = envexec.write_env_file(str(directory), "a-0", {"K": "v"})
    assert first != second
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert envexec.load_env(first) == {"K": "v"}
    assert not os.path.exists(first)  # read once, then gone


def test_wrapper_argv_holds_paths_and_the_command_only() -> None:
    argv = envexec.command(["agent", "--flag"], env_file="/s/run/x.env", cgroup="/cg/x")
    assert argv[1:3] == ["-I", "-S"] and argv[3].endswith("envexec.py")
    assert argv[4:] == ["--env-file", "/s/run/x.env", "--cgroup", "/cg/x", "--", "agent", "--flag"]
    assert envexec.parse_args(argv[4:]) == ("/s/run/x.env", "/cg/x", ["agent", "--flag"])
    assert envexec.is_wrapper(argv) and not envexec.is_wrapper(["agent", "--flag"])


def test_wrapper_refuses_arguments_it_does_not_know() -> None:
    with pytest.raises(SystemExit):
        envexec.parse_args(["--setenv", "K=v", "--", "x"])
    with pytest.raises(SystemExit):
        envexec.parse_args(["--env-file", "f", "--"])


def test_stale_env_files_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    old = envexec.write_env_file(str(tmp_path), "a-0", {"K": "v"})
    fresh = envexec.write_env_file(str(tmp_path), "b-0", {"K": "v"})
    os.utime(old, (0, 0))
    envexec.remove_stale(str(tmp_path))
    assert not os.path.exists(old) and os.path.exists(fresh)
