"""The supervisor registry (controller/plugins.py) is the one place that names the adapters:
the manifest schema, validation, the controller and `attach`/`capture` all read it."""

from __future__ import annotations

from pathlib import Path

from controller.manifests import json_schema, parse_text
from controller.plugins import SUPERVISORS
from controller.supervisors.base import Context, Terminal
from controller.supervisors.registry import adapter, build
from tests.unit.builders import manifest_yaml


def test_every_registered_kind_builds_its_adapter(tmp_path: Path) -> None:
    built = build(Context(tmp_path, "cid"))
    assert sorted(built) == sorted(SUPERVISORS)
    assert all(sup.kind == kind for kind, sup in built.items())


def test_the_schema_offers_exactly_the_registered_kinds() -> None:
    spec = json_schema()["$defs"]["AgentSpec"]["properties"]["supervisor"]
    assert spec["enum"] == list(SUPERVISORS)


def test_an_unknown_supervisor_is_an_error_naming_the_known_ones() -> None:
    _, errors = parse_text(manifest_yaml(supervisor="docker"), "m.yaml")
    assert len(errors) == 1 and errors[0].line == 6
    assert all(kind in errors[0].message for kind in SUPERVISORS)


def test_only_adapters_with_a_terminal_can_be_attached(tmp_path: Path) -> None:
    ctx = Context(tmp_path, "cid")
    has_terminal = {kind for kind in SUPERVISORS if isinstance(adapter(kind, ctx), Terminal)}
    assert has_terminal == {"tmux"}
    assert adapter("docker", ctx) is None
