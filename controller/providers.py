"""Provider presets: data that turns spec.model/prompt/mode/session/... into argv and env.

Pure logic, called by `desired` (argv of a spec), `loader` (per-provider checks for
`validate`) and `sessions` (argv with a session id at start). No if-chains per provider:
a preset is a template plus the values its CLI accepts; the config merges its own over them.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Union

from controller.manifests import AgentSpec

PLACEHOLDER = re.compile(r"\{(model|prompt|effort|approvalMode|tags|capabilities|newSessionId|resumeId|settingsFile|notifyConfig)\}")
PROVIDER_ARGS = "{providerArgs}"  # where spec.providerArgs go; appended at the end when a template lacks it

# A template item: a plain arg, or a group dropped whole when any placeholder in it is empty
# (a flag with its value, a subcommand with its id, `--` with the prompt).
Arg = Union[str, tuple[str, ...]]

INTERACTIVE, HEADLESS = "interactive", "headless"


@dataclass(frozen=True)
class Preset:
    executable: str
    args: tuple[Arg, ...] = ()  # interactive template; also headless when headless_args is None
    env: tuple[tuple[str, str], ...] = field(default=())
    headless_args: tuple[Arg, ...] | None = None
    approval_modes: tuple[str, ...] = ()  # what the CLI accepts in interactive mode; empty: anything
    headless_approval_modes: tuple[str, ...] | None = None  # None: as interactive
    efforts: tuple[str, ...] = ()  # empty: anything
    resume: str = ""  # "own-id": we choose the id (claude); "discover": the CLI's id is found (codex)
    headless_needs_prompt: bool = False  # print/exec mode reads stdin without one
    root_refused: tuple[str, ...] = ()  # approval modes the CLI refuses to run as root
    hooks: str = ""  # activity from the CLI's own hooks in interactive mode: "claude-settings", "codex-notify"
    checked_against: str = ""  # the CLI version these templates were checked with (`--help`, real runs)


@dataclass(frozen=True)
class SessionArgs:
    """Per-start session values; empty strings drop their groups from the template."""

    new_id: str = ""  # claude: --session-id on an instance's first start
    resume_id: str = ""  # claude: our id on later starts; codex: its own discovered id
    settings_file: str = ""  # claude interactive: the per-instance settings with the activity hooks
    notify_config: str = ""  # codex interactive: `notify=[...]`, the program told of finished turns


CLAUDE_ARGS: tuple[Arg, ...] = (
    ("--session-id", "{newSessionId}"),
    ("--resume", "{resumeId}"),
    ("--model", "{model}"),
    ("--effort", "{effort}"),
    ("--permission-mode", "{approvalMode}"),
    ("--settings", "{settingsFile}"),  # added to the argv at start (sessions.prepare), never hashed
    PROVIDER_ARGS,
    ("--", "{prompt}"),  # a prompt starting with `-` is never read as a flag
)
CODEX_TAIL: tuple[Arg, ...] = (
    ("--model", "{model}"),
    # effort is a config override (parsed as TOML, else taken as the literal string)
    ("-c", "model_reasoning_effort={effort}"),
)

BUILTIN: dict[str, Preset] = {
    "claude": Preset(
        "claude",
        CLAUDE_ARGS,
        # print mode: stream-json needs --verbose, else the CLI exits with an error
        headless_args=("-p", "--output-format", "stream-json", "--verbose", *CLAUDE_ARGS),
        approval_modes=("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "manual", "plan"),
        efforts=("low", "medium", "high", "xhigh", "max"),
        resume="own-id",
        headless_needs_prompt=True,
        root_refused=("bypassPermissions",),
        hooks="claude-settings",
        checked_against="claude 2.1.332 (Claude Code)",
    ),
    "codex": Preset(
        "codex",
        # --no-daemon: else the TUI starts a shared app-server that leaves the instance's process
        # group (setsid, parent 1): never stopped with the instance, its memory never counted
        (("resume", "{resumeId}"), "--no-daemon", *CODEX_TAIL, ("--ask-for-approval", "{approvalMode}"),
         ("-c", "{notifyConfig}"), PROVIDER_ARGS, ("--", "{prompt}")),
        # `codex exec resume` takes neither --sandbox nor --ask-for-approval: both go as config
        # overrides, which every exec form accepts; exec has nobody to ask, so approval is never
        headless_args=("exec", ("resume", "{resumeId}"), "--json", "--skip-git-repo-check",
                       "-c", 'sandbox_mode="workspace-write"', "-c", 'approval_policy="never"',
                       *CODEX_TAIL, PROVIDER_ARGS, ("--", "{prompt}")),
        approval_modes=("on-request", "never"),
        headless_approval_modes=("never",),
        efforts=("none", "minimal", "low", "medium", "high", "xhigh"),
        resume="discover",
        headless_needs_prompt=True,
        hooks="codex-notify",
        checked_against="codex-cli 0.171.0",
    ),
}


def merge_presets(overrides: dict[str, dict[str, Any]]) -> dict[str, Preset]:
    """Config presets over the built-ins; a preset named like a built-in keeps its unset fields.
    A config `args` is the template of both modes."""
    presets = dict(BUILTIN)
    for name, raw in overrides.items():
        base = presets.get(name)
        fields: dict[str, Any] = {}
        if "executable" in raw:
            fields["executable"] = raw["executable"]
        if "args" in raw:
            fields["args"] = tuple(a if isinstance(a, str) else tuple(a) for a in raw["args"])
            fields["headless_args"] = None
        if "env" in raw:
            fields["env"] = tuple(sorted(raw["env"].items()))
        presets[name] = replace(base, **fields) if base else Preset(**{"executable": name, **fields})
    return presets


def mode_of(spec: AgentSpec) -> str:
    """CONTRACT §9: interactive under tmux, headless under any other supervisor, unless given."""
    if spec.mode is not None:
        return spec.mode
    return INTERACTIVE if spec.supervisor == "tmux" else HEADLESS


def resumes(spec: AgentSpec) -> bool:
    return spec.provider is not None and spec.session is not None and spec.session.resume


def values_of(spec: AgentSpec, session: SessionArgs | None = None) -> dict[str, str]:
    session = session or SessionArgs()
    return {
        "model": spec.model or "",
        "prompt": spec.prompt or "",
        "effort": spec.effort or "",
        "approvalMode": spec.approval_mode or "",
        "tags": ",".join(spec.tags or ()),
        "capabilities": ",".join(spec.capabilities or ()),
        "newSessionId": session.new_id,
        "resumeId": session.resume_id,
        "settingsFile": session.settings_file,
        "notifyConfig": session.notify_config,
    }


def _fill(arg: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], arg)


def _empty(arg: str, values: dict[str, str]) -> bool:
    names = PLACEHOLDER.findall(arg)
    return bool(names) and not all(values[n] for n in names)


def render_args(template: Sequence[Arg], values: dict[str, str], extra: Sequence[str] = ()) -> list[str]:
    """Fill placeholders. A group with an empty placeholder is dropped whole; a plain arg whose
    placeholder is empty is dropped with the flag before it (config templates, CONTRACT §2)."""
    out: list[str] = []
    for arg in template:
        if arg == PROVIDER_ARGS:
            out.extend(extra)
        elif isinstance(arg, tuple):
            if not any(_empty(a, values) for a in arg):
                out.extend(_fill(a, values) for a in arg)
        elif _empty(arg, values):
            if out and out[-1].startswith("-") and not PLACEHOLDER.search(out[-1]) and not arg.startswith("-"):
                out.pop()
        else:
            out.append(_fill(arg, values))
    if PROVIDER_ARGS not in template:
        out.extend(extra)
    return out


def template_of(preset: Preset, mode: str) -> tuple[Arg, ...]:
    if mode == HEADLESS and preset.headless_args is not None:
        return preset.headless_args
    return preset.args


def render(preset: Preset, spec: AgentSpec, session: SessionArgs | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and env of a provider agent; spec.command, if given, replaces the executable."""
    head = list(spec.command) if spec.command else [preset.executable]
    args = render_args(template_of(preset, mode_of(spec)), values_of(spec, session), spec.provider_args or ())
    return head + args, dict(preset.env)


def display_argv(argv: Sequence[str]) -> str:
    """One line a shell would read back as the same argv; control characters (a prompt's
    newlines) are written as bash $'...' escapes, so the line stays one line."""
    return " ".join(shlex.quote(a) if a.isprintable() else _ansi_c(a) for a in argv)


def _ansi_c(arg: str) -> str:
    named = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'"}
    return "$'" + "".join(named.get(c) or (c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                                             else f"\\u{ord(c):04x}") for c in arg) + "'"


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
    values = values_of(spec)
    return {env: values[k] for k, env in ENV_OF_FIELD.items() if values[k]}


# -- validation (agentctl validate, and the controller's intake) ----------------
Problem = tuple[tuple[str, ...], str]  # (path of the offending field, message)


def check(name: str, preset: Preset, spec: AgentSpec, *, as_root: bool) -> list[Problem]:
    """What this provider's CLI would refuse, found before anything starts."""
    mode = mode_of(spec)
    problems: list[Problem] = []
    allowed = preset.approval_modes
    if mode == HEADLESS and preset.headless_approval_modes is not None:
        allowed = preset.headless_approval_modes
    if spec.approval_mode is not None and allowed and spec.approval_mode not in allowed:
        problems.append((("spec", "approvalMode"), f"spec.approvalMode: {spec.approval_mode!r} is not accepted by "
                         f"{name} in {mode} mode (accepted: {', '.join(allowed)})"))
    if spec.effort is not None and preset.efforts and spec.effort not in preset.efforts:
        problems.append((("spec", "effort"), f"spec.effort: {spec.effort!r} is not accepted by {name} "
                         f"(accepted: {', '.join(preset.efforts)})"))
    if resumes(spec) and not preset.resume:
        problems.append((("spec", "session"), f"spec.session.resume: provider {name} has no way to resume a session"))
    if mode == HEADLESS and preset.headless_needs_prompt and not spec.prompt:
        problems.append((("spec", "prompt"), f"spec.prompt: {name} in headless mode needs a prompt "
                         "(it would wait for one on stdin)"))
    # as_root: the controller runs as root and the agent's env does not set IS_SANDBOX=1 (the CLI's own escape)
    if as_root and spec.approval_mode in preset.root_refused:
        problems.append((("spec", "approvalMode"), f"spec.approvalMode: {name} refuses {spec.approval_mode} when run "
                         "as root; run agentctl as another user, or set env IS_SANDBOX=1 if the agent is sandboxed"))
    return problems
