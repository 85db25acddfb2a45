"""The manifest schema (pydantic v2, unknown fields forbidden) and parsing YAML text into it.

Pure: takes text, returns validated manifests and `FILE:LINE: message` errors. Reading
files, resolving paths against the base dir and reading envFiles live in `loader`.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from controller.plugins import SUPERVISORS

NAME_RE = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
ENV_KEY_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
LABEL_KEY_RE = r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,251}[A-Za-z0-9])?$"
LABEL_KEY = re.compile(LABEL_KEY_RE)
NAME = re.compile(NAME_RE)

# Bounds that keep a hostile file from costing unbounded time or memory.
MAX_DOCUMENTS = 1000
MAX_NODES = 100_000  # per document, counting every alias expansion
MAX_DEPTH = 64
# paths whose line a valid document keeps: what loader.resolve_doc and duplicate names report
KEPT_LINES = frozenset({("spec", "cwd"), ("spec", "envFiles"), ("spec", "provider"), ("metadata", "name"),
                        # provider checks of `loader` (providers.check) report these
                        ("spec", "approvalMode"), ("spec", "effort"), ("spec", "session"), ("spec", "prompt"),
                        ("spec", "mode")})

PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("NUL bytes are not allowed")
    return value


# a Python check: as a pydantic pattern, a negated class compiles to a Unicode regex of
# megabytes, once per field that uses it
NoNulStr = Annotated[str, AfterValidator(_no_nul)]


def _known_supervisor(value: str) -> str:
    if value not in SUPERVISORS:
        raise ValueError(f"unknown supervisor {value!r}: one of {', '.join(SUPERVISORS)}")
    return value


# the values come from the registry (controller.plugins): a new adapter needs no change here
SupervisorKind = Annotated[str, AfterValidator(_known_supervisor), Field(json_schema_extra={"enum": list(SUPERVISORS)})]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Metadata(Strict):
    name: Annotated[str, Field(max_length=63, json_schema_extra={"pattern": NAME_RE})]
    labels: dict[Annotated[str, Field(max_length=253, json_schema_extra={"pattern": LABEL_KEY_RE})], str] = Field(
        default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # Python's re again: pydantic-core compiles the {0,61} repeat into a 4 MiB regex
        if not NAME.match(value):
            raise ValueError(f"String should match pattern '{NAME_RE}'")
        return value

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        # checked with Python's re: as a pydantic pattern, {0,251} compiles to a 3.4 MiB regex
        bad = [k for k in value if not LABEL_KEY.match(k)]
        if bad:
            raise ValueError(f"invalid label key {bad[0]!r}: letters, digits, '-', '_', '.', '/'")
        return value


class Backoff(Strict):
    initial_seconds: NonNegFloat = Field(1.0, alias="initialSeconds")
    max_seconds: NonNegFloat = Field(300.0, alias="maxSeconds")
    reset_after_seconds: NonNegFloat = Field(600.0, alias="resetAfterSeconds")


class MaxRestarts(Strict):
    count: Annotated[int, Field(ge=0)]
    window_seconds: PosFloat = Field(alias="windowSeconds")


def signal_number(name: str) -> int:
    """SIGTERM, TERM and 15 all name the same signal."""
    if name.isdigit():
        return signal.Signals(int(name)).value
    upper = name.upper()
    return signal.Signals[upper if upper.startswith("SIG") else "SIG" + upper].value


class StopSpec(Strict):
    signal: str = "SIGTERM"
    grace_period_seconds: Annotated[float, Field(ge=0, le=600)] = Field(10.0, alias="gracePeriodSeconds")

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        try:
            signal_number(value)
        except (KeyError, ValueError):
            raise ValueError(f"unknown signal {value!r}") from None
        return value


class HttpGet(Strict):
    url: str

    @field_validator("url")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        match = re.match(r"^http://(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|localhost|\[::1\])(:\d{1,5})?(/.*)?$", value)
        if not match:
            raise ValueError("httpGet.url must be http:// on a loopback address (127.0.0.0/8, localhost, [::1])")
        return value


class Liveness(Strict):
    log_idle_seconds: PosFloat | None = Field(None, alias="logIdleSeconds")
    exec: list[NoNulStr] | None = Field(None, min_length=1)
    http_get: HttpGet | None = Field(None, alias="httpGet")
    period_seconds: PosFloat = Field(10.0, alias="periodSeconds")
    timeout_seconds: PosFloat = Field(5.0, alias="timeoutSeconds")
    failure_threshold: Annotated[int, Field(ge=1)] = Field(3, alias="failureThreshold")

    @model_validator(mode="after")
    def _exactly_one_probe(self) -> Liveness:
        given = [k for k in ("log_idle_seconds", "exec", "http_get") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("liveness needs exactly one of logIdleSeconds, exec, httpGet")
        return self


class Resources(Strict):
    memory_limit_mib: PosFloat | None = Field(None, alias="memoryLimitMiB")


class Logs(Strict):
    max_bytes: Annotated[int, Field(ge=1024)] = Field(10 * 1024 * 1024, alias="maxBytes")
    backups: Annotated[int, Field(ge=0, le=100)] = 3


class Placement(Strict):
    hosts: list[str] | None = None
    host_labels: dict[str, str] | None = Field(None, alias="hostLabels")


class Session(Strict):
    resume: bool = False  # restarts continue the same conversation (CONTRACT §9)


class AgentSpec(Strict):
    command: list[NoNulStr] | None = Field(None, min_length=1)
    provider: str | None = None
    model: str | None = None
    prompt: str | None = None
    effort: str | None = None
    approval_mode: str | None = Field(None, alias="approvalMode")
    tags: list[str] | None = None
    capabilities: list[str] | None = None
    provider_args: list[NoNulStr] | None = Field(None, alias="providerArgs")
    session: Session | None = None
    cwd: NoNulStr | None = None
    env: dict[Annotated[str, Field(pattern=ENV_KEY_RE)], NoNulStr] = Field(default_factory=dict)
    env_files: list[NoNulStr] = Field(default_factory=list, alias="envFiles")
    replicas: Annotated[int, Field(ge=0, le=100)] = 1
    supervisor: SupervisorKind = "process"
    # after supervisor: its validator reads the supervisor. None: interactive under tmux, else headless
    mode: Literal["interactive", "headless"] | None = None
    restart_policy: Literal["Always", "OnFailure", "Never"] = Field("Always", alias="restartPolicy")
    backoff: Backoff = Backoff.model_validate({})
    max_restarts: MaxRestarts | None = Field(None, alias="maxRestarts")
    stop: StopSpec = StopSpec.model_validate({})
    liveness: Liveness | None = None
    resources: Resources = Resources.model_validate({})
    suspend: bool = False
    logs: Logs = Logs.model_validate({})
    placement: Placement | None = None

    @field_validator("mode")
    @classmethod
    def _interactive_needs_tmux(cls, value: str | None, info: ValidationInfo) -> str | None:
        supervisor = info.data.get("supervisor", "process")
        if value == "interactive" and supervisor != "tmux":
            raise ValueError(f"interactive mode needs a terminal: supervisor tmux, not {supervisor} "
                             "(or mode: headless)")
        return value

    @model_validator(mode="after")
    def _command_or_provider(self) -> AgentSpec:
        if self.command is None and self.provider is None:
            raise ValueError("spec needs a command (or a provider)")
        provider_only = ("model", "prompt", "effort", "approval_mode", "tags", "capabilities", "provider_args",
                         "mode", "session")
        stray = [f for f in provider_only if getattr(self, f) is not None]
        if stray and self.provider is None:
            alias = AgentSpec.model_fields[stray[0]].alias or stray[0]
            raise ValueError(f"{alias} is only meaningful with a provider")
        return self


class AgentManifest(Strict):
    api_version: Literal["agentctl/v1"] = Field(alias="apiVersion")
    kind: Literal["Agent"]
    metadata: Metadata
    spec: AgentSpec


def json_schema() -> dict[str, Any]:
    schema = AgentManifest.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "agentctl Agent manifest (agentctl/v1)"
    return schema


@dataclass(frozen=True)
class ManifestError:
    file: str
    line: int
    message: str
    agent: str | None = None  # the metadata.name of the document, when it could be read

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class ParsedDocument:
    manifest: AgentManifest
    line: int  # first line of the document
    lines: dict[tuple[str | int, ...], int] = field(default_factory=dict, compare=False, repr=False)

    def line_of(self, *path: str | int) -> int:
        return line_for(self.lines, path, self.line)


def line_for(lines: dict[tuple[str | int, ...], int], path: tuple[str | int, ...], default: int) -> int:
    """The line of the deepest known prefix of `path`."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return default


def _loader_class() -> type[yaml.SafeLoader]:
    loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return loader


def _walk(node: yaml.Node, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int],
          depth: int, sizes: dict[int, int]) -> int:
    """Record the line of every path, reject duplicate keys, and measure the expanded size."""
    if depth > MAX_DEPTH:
        raise _TooBig(node, f"document nests deeper than {MAX_DEPTH} levels")
    cached = sizes.get(id(node))
    if cached is not None:
        return cached  # an alias: its size counts again, its lines were already recorded
    lines.setdefault(path, node.start_mark.line + 1)
    size = 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark.line)
            if name in seen and name != "<<":
                raise _TooBig(key, f"duplicate key {name!r}")
            seen.add(name)
            lines.setdefault(path + (name,), key.start_mark.line + 1)
            size += _walk(value, path + (name,), lines, depth + 1, sizes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            size += _walk(item, path + (i,), lines, depth + 1, sizes)
    sizes[id(node)] = size
    if size > MAX_NODES:
        raise _TooBig(node, f"document expands to more than {MAX_NODES} nodes (alias bomb?)")
    return size


class _TooBig(Exception):
    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.line = node.start_mark.line + 1


def _too_big(text: str) -> tuple[int, str] | None:
    """(line, why) of the first collection nested deeper than MAX_DEPTH, or of the event past
    MAX_NODES in one document, from parser events alone: the composer recurses once per level
    (overflowing the C stack long before _walk could object) and builds everything it reads."""
    depth = events = 0
    for event in yaml.parse(text, Loader=_loader_class()):
        events += 1
        line = event.start_mark.line + 1 if event.start_mark else 1
        if isinstance(event, yaml.DocumentStartEvent):
            events = 0
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                return line, f"document nests deeper than {MAX_DEPTH} levels"
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if events > MAX_NODES:
            return line, f"document has more than {MAX_NODES} nodes"
    return None


def _raw_documents(text: str, file: str) -> Iterator[tuple[Any, int, dict[tuple[str | int, ...], int]] | ManifestError]:
    try:
        too_big = _too_big(text)
    except yaml.YAMLError:
        too_big = None  # reported with its line by the pass below
    if too_big is not None:
        yield ManifestError(file, *too_big)
        return
    loader = _loader_class()(text)
    try:
        count = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            count += 1
            if count > MAX_DOCUMENTS:
                yield ManifestError(file, node.start_mark.line + 1, f"more than {MAX_DOCUMENTS} documents in one file")
                return
            lines: dict[tuple[str | int, ...], int] = {}
            try:
                _walk(node, (), lines, 0, {})
            except _TooBig as exc:
                yield ManifestError(file, exc.line, str(exc))
                continue
            yield loader.construct_document(node), node.start_mark.line + 1, lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        yield ManifestError(file, line, f"YAML syntax error: {exc.problem or exc}")
    except yaml.YAMLError as exc:
        yield ManifestError(file, 1, f"YAML error: {exc}")
    finally:
        loader.dispose()


def _loc_name(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _errors_of(exc: ValidationError, file: str, lines: dict[tuple[str | int, ...], int],
               line: int, agent: str | None) -> list[ManifestError]:
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = _loc_name(loc)
        message = err["msg"].removeprefix("Value error, ")
        out.append(ManifestError(file, line_for(lines, loc, line), f"{where}: {message}" if where else message, agent))
    return out


def _name_of(data: Any) -> str | None:
    if isinstance(data, dict):
        meta = data.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if isinstance(name, str) and re.match(NAME_RE, name):
            return name  # only a valid name may name an agent (and so a status file)
    return None


def parse_text(text: str, file: str) -> tuple[list[ParsedDocument], list[ManifestError]]:
    """Every document of one file, validated; errors carry the line of the offending field."""
    docs: list[ParsedDocument] = []
    errors: list[ManifestError] = []
    for item in _raw_documents(text, file):
        if isinstance(item, ManifestError):
            errors.append(item)
            continue
        data, line, lines = item
        if data is None:
            continue
        if not isinstance(data, dict):
            errors.append(ManifestError(file, line, "a manifest must be a mapping (apiVersion, kind, metadata, spec)"))
            continue
        try:
            manifest = AgentManifest.model_validate(data)
            # a valid document keeps only the lines that later checks can report (cwd, envFiles...)
            kept = {k: v for k, v in lines.items() if k[:2] in KEPT_LINES}
            docs.append(ParsedDocument(manifest, line, kept))
        except ValidationError as exc:
            errors.extend(_errors_of(exc, file, lines, line, _name_of(data)))
    return docs, errors


@dataclass(frozen=True)
class Loaded:
    """One valid manifest with everything read from disk that its instances need (the loader
    reads it; `desired` computes from it without touching the disk)."""

    manifest: AgentManifest
    source: str
    line: int
    cwd: str
    env_from_files: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return self.manifest.metadata.name
