"""Provider presets: data that turns spec.model/prompt/... into argv and env.

Pure. Built-in presets for `claude` and `codex`; the controller config merges its own
over them (same name: field by field). No if-chains per provider: a preset is a template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from controller.manifests import AgentSpec

PLACEHOLDER = re.compile(r"\{(model|prompt|effort|approvalMode|tags|capabilities)\}")


@dataclass(frozen=True)
class Preset:
    executable: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=())


BUILTIN: dict[str, Preset] = {
    # claude: an interactive session opened on the prompt, in the given permission mode
    "claude": Preset("claude", ("--model", "{model}", "--permission-mode", "{approvalMode}", "{prompt}")),
    # codex: reasoning effort is a config override, approval mode a flag
    "codex": Preset(
        "codex",
        ("--model", "{model}", "--ask-for-approval", "{approvalMode}", "-c", "model_reasoning_effort={effort}", "{prompt}"),
    ),
}


def merge_presets(overrides: dict[str, dict[str, Any]]) -> dict[str, Preset]:
    """Config presets over the built-ins; a preset named like a built-in keeps its unset fields."""
    presets = dict(BUILTIN)
    for name, raw in overrides.items():
        base = presets.get(name)
        fields: dict[str, Any] = {}
        if "executable" in raw:
            fields["executable"] = raw["executable"]
        if "args" in raw:
            fields["args"] = tuple(raw["args"])
        if "env" in raw:
            fields["env"] = tuple(sorted(raw["env"].items()))
        presets[name] = replace(base, **fields) if base else Preset(**{"executable": name, **fields})
    return presets


def values_of(spec: AgentSpec) -> dict[str, str]:
    return {
        "model": spec.model or "",
        "prompt": spec.prompt or "",
        "effort": spec.effort or "",
        "approvalMode": spec.approval_mode or "",
        "tags": ",".join(spec.tags or ()),
        "capabilities": ",".join(spec.capabilities or ()),
    }


def render_args(template: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """Fill placeholders; an arg whose placeholder is empty is dropped with the flag before it."""
    out: list[str] = []
    for arg in template:
        names = PLACEHOLDER.findall(arg)
        if names and not all(values[n] for n in names):
            if out and out[-1].startswith("-") and not arg.startswith("-") and not PLACEHOLDER.search(out[-1]):
                out.pop()
            continue
        out.append(PLACEHOLDER.sub(lambda m: values[m.group(1)], arg))
    return out


def render(preset: Preset, spec: AgentSpec) -> tuple[list[str], dict[str, str]]:
    """argv and env of a provider agent; spec.command, if given, replaces the executable."""
    head = list(spec.command) if spec.command else [preset.executable]
    argv = head + render_args(preset.args, values_of(spec)) + list(spec.provider_args or ())
    return argv, dict(preset.env)


ENV_OF_FIELD = {
    "model": "AGENTCTL_MODEL",
    "prompt": "AGENTCTL_PROMPT",
    "effort": "AGENTCTL_EFFORT",
    "approvalMode": "AGENTCTL_APPROVAL_MODE",
    "tags": "AGENTCTL_TAGS",
    "capabilities": "AGENTCTL_CAPABILITIES",
}


def field_env(spec: AgentSpec) -> dict[str, str]:
    """AGENTCTL_MODEL ... for the provider fields that are set (CONTRACT §6)."""
    return {ENV_OF_FIELD[k]: v for k, v in values_of(spec).items() if v}
