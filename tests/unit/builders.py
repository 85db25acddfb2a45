"""Small builders for unit tests: manifests from inline YAML, desired agents, instance records.

Everything goes through the real code paths (`manifests.parse_text`, `desired.desire`), so a
test that builds a DesiredAgent also exercises the schema defaults a user would get.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import yaml

from controller.desired import DesiredAgent, desire
from controller.loader import Loaded
from controller.manifests import AgentManifest, parse_text
from controller.model import ExitInfo, ExitReason, Handle, InstanceRecord, InstanceSpec, RunState
from controller.providers import BUILTIN, Preset

COMMAND = ["python3", "-u", "agent.py"]


def manifest_yaml(name: str = "reviewer", *, labels: Mapping[str, str] | None = None, **spec: Any) -> str:
    """One Agent document; spec fields are given by their manifest (camelCase) names.

    Lists and maps of scalars are written in flow style: `metadata` is line 3, `command`
    line 5 and the first field given here line 6.
    """
    metadata: dict[str, Any] = {"name": name}
    if labels is not None:
        metadata["labels"] = dict(labels)
    fields = {k: v for k, v in {"command": COMMAND, **spec}.items() if v is not None}  # command=None: omit it
    body = {"apiVersion": "agentctl/v1", "kind": "Agent", "metadata": metadata, "spec": fields}
    return yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def parse_manifest(text: str, file: str = "m.yaml") -> AgentManifest:
    docs, errors = parse_text(text, file)
    assert not errors, [str(e) for e in errors]
    assert len(docs) == 1
    return docs[0].manifest


def loaded(name: str = "reviewer", *, cwd: str = "/srv/base", env_from_files: Mapping[str, str] | None = None,
           labels: Mapping[str, str] | None = None, **spec: Any) -> Loaded:
    manifest = parse_manifest(manifest_yaml(name, labels=labels, **spec))
    return Loaded(manifest, "manifests/m.yaml", 1, cwd, tuple(sorted((env_from_files or {}).items())))


def desired(name: str = "reviewer", *, presets: Mapping[str, Preset] = BUILTIN,
            default_env: Mapping[str, str] | None = None, cwd: str = "/srv/base",
            env_from_files: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
            **spec: Any) -> DesiredAgent:
    src = loaded(name, cwd=cwd, env_from_files=env_from_files, labels=labels, **spec)
    return desire(src, presets=presets, default_env=default_env or {}, log_dir="/tmp/x")


def running(inst: InstanceSpec, **changes: Any) -> InstanceRecord:
    """A live instance of exactly this spec, started at monotonic 0."""
    rec = InstanceRecord(id=inst.id, agent=inst.agent, index=inst.index, supervisor=inst.supervisor,
                         spec_hash=inst.spec_hash, state=RunState.RUNNING,
                         handle=Handle(pid=1000 + inst.index, pgid=1000 + inst.index, start_ticks=42))
    return replace(rec, **changes)


def exit_info(reason: str = ExitReason.ERROR, *, code: int | None = 1, runtime: float = 5.0) -> ExitInfo:
    return ExitInfo(exit_code=code, signal=None, at=1_700_000_000.0, runtime_seconds=runtime, reason=reason)


def exited(inst: InstanceSpec, reason: str = ExitReason.ERROR, *, code: int | None = 1, runtime: float = 5.0,
           **changes: Any) -> InstanceRecord:
    """An instance slot whose process is gone, with a fresh exit the planner has not acted on."""
    rec = replace(running(inst), state=RunState.EXITED, handle=None,
                  last_exit=exit_info(reason, code=code, runtime=runtime))
    return replace(rec, **changes)


def stopping(inst: InstanceSpec, *, deadline: float, reason: str = ExitReason.SPEC_CHANGED,
             **changes: Any) -> InstanceRecord:
    rec = replace(running(inst), state=RunState.STOPPING, stop_reason=reason, stop_deadline=deadline)
    return replace(rec, **changes)
