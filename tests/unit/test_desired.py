"""desired + providers: argv and env of every instance (CONTRACT §6), the spec hash, placement."""

from __future__ import annotations

import re
from typing import Any

import pytest

from controller.desired import DesiredAgent, placed_here
from controller.providers import Preset, merge_presets, render_args
from tests.unit.builders import desired, manifest_yaml, parse_manifest


def env_of(agent: DesiredAgent, index: int = 0) -> dict[str, str]:
    return dict(agent.instances[index].env)


def claude(**spec: Any) -> DesiredAgent:
    return desired(command=None, provider="claude", **spec)


# -- provider presets ----------------------------------------------------------------------

# argv of the built-in claude and codex presets: tests/unit/test_providers.py


def test_config_can_define_a_new_preset_with_its_own_env() -> None:
    presets = merge_presets({"mybot": {"executable": "/usr/local/bin/mybot",
                                       "args": ["--model", "{model}", "--prompt", "{prompt}", "--tags", "{tags}"],
                                       "env": {"MYBOT_HEADLESS": "1"}}})
    agent = desired(command=None, provider="mybot", presets=presets, prompt="p", tags=["a", "b"])
    assert agent.instances[0].argv == ("/usr/local/bin/mybot", "--prompt", "p", "--tags", "a,b")
    assert env_of(agent)["MYBOT_HEADLESS"] == "1"


def test_preset_without_executable_runs_a_command_named_like_the_preset() -> None:
    assert merge_presets({"aider": {"args": ["{prompt}"]}})["aider"] == Preset("aider", ("{prompt}",))


def test_empty_self_contained_flag_does_not_take_an_unrelated_flag_with_it() -> None:
    assert render_args(("--headless", "--model={model}"), {"model": ""}) == ["--headless"]


# -- environment -------------------------------------------------------------------------------

def test_env_precedence_default_then_preset_then_env_files_then_manifest() -> None:
    presets = merge_presets({"claude": {"env": {"P": "preset", "Q": "preset", "R": "preset"}}})
    agent = claude(presets=presets,
                   default_env={"D": "default", "P": "default", "Q": "default", "R": "default", "S": "default"},
                   env_from_files={"Q": "file", "R": "file"},
                   env={"R": "manifest"})
    env = env_of(agent)
    assert (env["D"], env["P"], env["Q"], env["R"], env["S"]) == ("default", "preset", "file", "manifest", "default")


def test_agentctl_variables_are_always_set_and_win_over_the_manifest() -> None:
    agent = desired("reviewer", replicas=2, env={"AGENTCTL_AGENT": "spoof", "AGENTCTL_INSTANCE": "spoof",
                                                 "AGENTCTL_SPEC_HASH": "spoof", "AGENTCTL_LOG_FILE": "/dev/null"})
    for i in (0, 1):
        env = env_of(agent, i)
        assert env["AGENTCTL_AGENT"] == "reviewer"
        assert env["AGENTCTL_INSTANCE"] == f"reviewer-{i}"
        assert env["AGENTCTL_SPEC_HASH"] == agent.spec_hash
        assert env["AGENTCTL_LOG_FILE"] == f"/tmp/x/reviewer-{i}.log"


def test_provider_fields_are_given_as_agentctl_variables_when_set() -> None:
    env = env_of(claude(model="opus", prompt="hi", effort="low", approvalMode="plan",
                        tags=["x", "y"], capabilities=["web", "git"]))
    assert {k: v for k, v in env.items() if k.startswith("AGENTCTL_") and k not in (
        "AGENTCTL_AGENT", "AGENTCTL_INSTANCE", "AGENTCTL_SPEC_HASH", "AGENTCTL_LOG_FILE")} == {
        "AGENTCTL_MODEL": "opus", "AGENTCTL_PROMPT": "hi", "AGENTCTL_EFFORT": "low",
        "AGENTCTL_APPROVAL_MODE": "plan", "AGENTCTL_TAGS": "x,y", "AGENTCTL_CAPABILITIES": "web,git"}


def test_unset_provider_fields_leave_no_agentctl_variable() -> None:
    env = env_of(claude(model="opus"))
    assert "AGENTCTL_PROMPT" not in env and "AGENTCTL_TAGS" not in env and env["AGENTCTL_MODEL"] == "opus"


def test_instances_are_named_name_dash_index_and_share_one_spec() -> None:
    agent = desired("reviewer", replicas=3, cwd="/srv/work", supervisor="tmux")
    assert [(i.id, i.index, i.agent) for i in agent.instances] == [
        ("reviewer-0", 0, "reviewer"), ("reviewer-1", 1, "reviewer"), ("reviewer-2", 2, "reviewer")]
    assert {(i.argv, i.cwd, i.supervisor, i.spec_hash) for i in agent.instances} == {
        (("python3", "-u", "agent.py"), "/srv/work", "tmux", agent.spec_hash)}


def test_zero_replicas_desire_no_instances() -> None:
    assert desired(replicas=0).instances == ()


def test_stop_signal_is_resolved_to_its_number() -> None:
    assert desired(stop={"signal": "HUP"}).stop_signal == 1
    assert desired().stop_signal == 15


# -- the spec hash ----------------------------------------------------------------------------

BASE: dict[str, Any] = {"command": ["python3", "agent.py"], "env": {"A": "1"}}


def hash_with(**changes: Any) -> str:
    fields = {**BASE, **changes}
    return desired(**fields).spec_hash


def test_spec_hash_is_a_sha256_digest() -> None:
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hash_with())
    assert hash_with() == hash_with()


@pytest.mark.parametrize("change", [
    {"command": ["python3", "other.py"]},
    {"env": {"A": "2"}},
    {"env": {"A": "1", "B": "1"}},
    {"cwd": "/srv/elsewhere"},
    {"env_from_files": {"TOKEN": "new"}},
    {"default_env": {"HTTPS_PROXY": "http://127.0.0.1:3128"}},
    {"supervisor": "tmux"},
    {"resources": {"memoryLimitMiB": 512}},
    {"command": None, "provider": "claude"},
], ids=lambda c: ",".join(c))
def test_fields_that_shape_the_process_change_the_spec_hash(change: dict[str, Any]) -> None:
    assert hash_with(**change) != hash_with()


@pytest.mark.parametrize("change", [
    {"labels": {"team": "infra"}},
    {"restartPolicy": "Never"},
    {"backoff": {"initialSeconds": 5, "maxSeconds": 60, "resetAfterSeconds": 10}},
    {"maxRestarts": {"count": 5, "windowSeconds": 600}},
    {"liveness": {"logIdleSeconds": 30}},
    {"stop": {"signal": "SIGINT", "gracePeriodSeconds": 60}},
    {"replicas": 5},
    {"suspend": True},
    {"logs": {"maxBytes": 4096, "backups": 1}},
    {"placement": {"hosts": ["gpu-1"]}},
], ids=lambda c: ",".join(c))
def test_fields_that_do_not_shape_the_process_keep_the_spec_hash(change: dict[str, Any]) -> None:
    assert hash_with(**change) == hash_with()


def test_provider_field_changes_change_the_spec_hash() -> None:
    assert claude(model="opus").spec_hash != claude(model="sonnet").spec_hash
    assert claude(prompt="a").spec_hash != claude(prompt="b").spec_hash


def test_config_preset_executable_change_changes_the_spec_hash() -> None:
    moved = merge_presets({"claude": {"executable": "/opt/bin/claude"}})
    assert claude(presets=moved).spec_hash != claude().spec_hash


# -- placement ----------------------------------------------------------------------------------

HOST, LABELS = "gpu-1", {"gpu": "true", "zone": "a"}


@pytest.mark.parametrize(("placement", "here"), [
    (None, True),
    ({"hosts": ["gpu-1", "gpu-2"]}, True),
    ({"hosts": ["gpu-2"]}, False),
    ({"hosts": []}, False),
    ({"hostLabels": {"gpu": "true"}}, True),
    ({"hostLabels": {"gpu": "true", "zone": "a"}}, True),
    ({"hostLabels": {"gpu": "false"}}, False),
    ({"hostLabels": {"disk": "ssd"}}, False),
    ({"hostLabels": {}}, True),
    ({"hosts": ["gpu-1"], "hostLabels": {"gpu": "true"}}, True),
    ({"hosts": ["gpu-1"], "hostLabels": {"zone": "b"}}, False),
    ({"hosts": ["gpu-2"], "hostLabels": {"gpu": "true"}}, False),
])
def test_agent_runs_here_only_if_every_given_placement_condition_matches(
        placement: dict[str, Any] | None, here: bool) -> None:
    manifest = parse_manifest(manifest_yaml(placement=placement))
    assert placed_here(manifest, HOST, LABELS) is here
