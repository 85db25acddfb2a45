"""Controller settings: the `run` flags, the config file that holds their defaults, placement.

Model layer: pydantic validation of the config file (unknown keys are errors) and the
merge rule "command line over config file over built-in default". Reads no files itself.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from controller.manifests import ENV_KEY_RE, NoNulStr


GIT_MAX_BYTES = 100 * 1024 * 1024  # what one revision's export of the path may hold (CONTRACT §11)


class GitSource(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    url: str
    ref: str | None = None
    path: str | None = None
    interval: float = Field(30.0, gt=0)
    max_bytes: int = Field(GIT_MAX_BYTES, gt=0, alias="maxBytes")


EnvKey = Annotated[str, Field(pattern=ENV_KEY_RE)]


class ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    executable: NoNulStr | None = None
    args: list[NoNulStr] | None = None
    env: dict[EnvKey, NoNulStr] | None = None


class EtcdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    # http(s)://HOST:PORT: a typo must not silently fall back to a default host
    endpoints: list[Annotated[str, Field(pattern=r"^https?://[^/\s:]+(:\d{1,5})?/?$|^https?://\[[0-9a-fA-F:]+\](:\d{1,5})?/?$")]] = Field(min_length=1)
    ca_file: str | None = Field(None, alias="caFile")
    cert_file: str | None = Field(None, alias="certFile")
    key_file: str | None = Field(None, alias="keyFile")


class Coordination(BaseModel):
    """CONTRACT §10: `coordination:` in the config, or --etcd-endpoints/--fleet/--lease-ttl."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, frozen=True)
    etcd: EtcdConfig
    fleet: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    lease_ttl: int = Field(10, ge=2, le=60, alias="leaseTTL")


class GitWrapper(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    git: GitSource


class ConfigFile(BaseModel):
    """The YAML of `agentctl run --config FILE` (CONTRACT §2)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)
    # a directory, or a Git source written as `manifests: {git: {...}}`, `manifests: {url: ...}` or `git: {...}`
    manifests: str | GitWrapper | GitSource | None = None
    git: GitSource | None = None
    state_dir: str | None = Field(None, alias="stateDir")
    base_dir: str | None = Field(None, alias="baseDir")
    metrics_addr: str | None = Field(None, alias="metricsAddr")
    resync: float | None = Field(None, gt=0)
    max_agents: int | None = Field(None, ge=0, alias="maxAgents")
    log_format: str | None = Field(None, alias="logFormat", pattern="^(text|json)$")
    stop_agents_on_exit: bool | None = Field(None, alias="stopAgentsOnExit")
    host_name: str | None = Field(None, alias="hostName")
    host_labels: dict[str, str] | None = Field(None, alias="hostLabels")
    allow_insecure_manifests: bool | None = Field(None, alias="allowInsecureManifests")
    git_url: str | None = Field(None, alias="gitUrl")
    git_ref: str | None = Field(None, alias="gitRef")
    git_path: str | None = Field(None, alias="gitPath")
    git_interval: float | None = Field(None, gt=0, alias="gitInterval")
    http_allowed_hosts: str | list[str] | None = Field(None, alias="httpAllowedHosts")  # comma list, or a YAML list
    git_max_bytes: int | None = Field(None, gt=0, alias="gitMaxBytes")
    env: dict[EnvKey, NoNulStr] = Field(default_factory=dict)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    coordination: Coordination | None = None

    def git_source(self) -> GitSource | None:
        if isinstance(self.manifests, GitWrapper):
            return self.manifests.git
        if isinstance(self.manifests, GitSource):
            return self.manifests
        return self.git


class Settings(BaseModel):
    """Everything `run`/`plan` need, after merging flags over the config file."""

    model_config = ConfigDict(frozen=True)
    manifests: Path = Path("manifests")
    state_dir: Path = Path(".agentctl")
    base_dir: Path = Field(default_factory=Path.cwd)
    metrics_addr: str = "127.0.0.1:9478"
    resync: float = 30.0
    max_agents: int | None = None
    log_format: str = "text"
    stop_agents_on_exit: bool = False
    host_name: str = Field(default_factory=socket.gethostname)
    host_labels: dict[str, str] = Field(default_factory=dict)
    allow_insecure_manifests: bool = False
    http_allowed_hosts: tuple[str, ...] = ()  # Host names the HTTP listener answers beyond its own address
    git: GitSource | None = None
    env: dict[str, str] = Field(default_factory=dict)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    once: bool = False
    coordination: Coordination | None = None  # a fleet on etcd (CONTRACT §10); None: this host alone

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def status_dir(self) -> Path:
        return self.state_dir / "status"


def parse_host_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` -> dict; raises ValueError naming the bad item."""
    labels: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"host label {item!r} is not key=value")
        labels[key] = value
    return labels


HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?$")


def parse_allowed_hosts(value: str | list[str]) -> tuple[str, ...]:
    """`--http-allowed-hosts a.example,b.example:8080` -> lowercased names; ValueError names a bad one."""
    items = value.split(",") if isinstance(value, str) else value
    names = []
    for item in filter(None, (p.strip() for p in items)):
        if not HOST_RE.match(item):
            raise ValueError(f"allowed host {item!r} is not NAME or NAME:PORT (no scheme, no path)")
        names.append(item.lower())
    return tuple(names)


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_size(text: str) -> int:
    """`104857600`, `100Mi`, `1G` -> bytes; raises ValueError naming the bad value."""
    value = text.strip().lower().removesuffix("b")
    number = value.rstrip("kmgi")
    unit = value[len(number):]
    if not number.isdigit() or unit not in _UNITS or int(number) <= 0:
        raise ValueError(f"size {text!r} is not a positive number of bytes (e.g. 104857600, 100Mi, 1G)")
    return int(number) * _UNITS[unit]
