"""Controller settings: --host-labels and --metrics-addr parsing, and the config file schema."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from controller.settings import (
    GIT_MAX_BYTES,
    ConfigFile,
    GitSource,
    Settings,
    is_loopback,
    parse_addr,
    parse_host_labels,
    parse_size,
)


@pytest.mark.parametrize(("text", "labels"), [
    ("", {}),
    ("gpu=true", {"gpu": "true"}),
    ("gpu=true,zone=eu-1", {"gpu": "true", "zone": "eu-1"}),
    (" gpu=true , zone=a ,", {"gpu": "true", "zone": "a"}),
    ("empty=", {"empty": ""}),
    ("url=a=b", {"url": "a=b"}),
])
def test_host_labels_parse_as_comma_separated_key_value_pairs(text: str, labels: dict[str, str]) -> None:
    assert parse_host_labels(text) == labels


@pytest.mark.parametrize("text", ["gpu", "gpu=true,zone", "=true"])
def test_host_label_without_key_or_equals_is_rejected_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="is not key=value"):
        parse_host_labels(text)


@pytest.mark.parametrize(("text", "addr"), [
    ("127.0.0.1:9478", ("127.0.0.1", 9478)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9478", ("::1", 9478)),
    (":9478", ("127.0.0.1", 9478)),
])
def test_metrics_addr_parses_as_host_and_port(text: str, addr: tuple[str, int]) -> None:
    assert parse_addr(text) == addr


@pytest.mark.parametrize("text", ["9478", "localhost", "host:", "host:http", "host:65536", "host:-1"])
def test_bad_metrics_addr_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_addr(text)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("localhost", True), ("::1", True),
    ("0.0.0.0", False), ("10.0.0.1", False), ("", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


CONTRACT_EXAMPLE = """\
manifests: ./manifests
stateDir: ./.agentctl
metricsAddr: 127.0.0.1:9478
maxAgents: 200
hostName: gpu-1
hostLabels: {gpu: "true"}
env: {HTTPS_PROXY: http://127.0.0.1:3128}
providers:
  claude: {executable: /opt/bin/claude}
  mybot:
    executable: /usr/local/bin/mybot
    args: ["--model", "{model}", "--prompt", "{prompt}"]
    env: {MYBOT_HEADLESS: "1"}
"""


def config(text: str) -> ConfigFile:
    return ConfigFile.model_validate(yaml.safe_load(textwrap.dedent(text)))


def test_the_contract_example_config_is_valid() -> None:
    cfg = config(CONTRACT_EXAMPLE)
    assert (cfg.manifests, cfg.state_dir, cfg.max_agents, cfg.host_name) == ("./manifests", "./.agentctl", 200, "gpu-1")
    assert cfg.host_labels == {"gpu": "true"} and cfg.env == {"HTTPS_PROXY": "http://127.0.0.1:3128"}
    assert cfg.providers["claude"].executable == "/opt/bin/claude" and cfg.providers["claude"].args is None
    assert cfg.providers["mybot"].env == {"MYBOT_HEADLESS": "1"}


def test_git_manifests_source_is_a_mapping() -> None:
    cfg = config("manifests: {url: 'https://example.com/agents.git', ref: main, path: agents, interval: 30}\n")
    assert cfg.manifests == GitSource(url="https://example.com/agents.git", ref="main", path="agents", interval=30)


@pytest.mark.parametrize("text", [
    "bogus: 1\n",
    "state_dir: ./x\n",  # flags are camelCase in the config file
    "providers: {claude: {executable: x, colour: red}}\n",
    "manifests: {url: x, branch: main}\n",
    "logFormat: xml\n",
    "maxAgents: -1\n",
    "resync: 0\n",
    "maxAgents: '200'\n",
])
def test_config_file_rejects_unknown_keys_and_bad_values(text: str) -> None:
    with pytest.raises(ValidationError):
        config(text)


def test_config_env_names_are_checked() -> None:
    with pytest.raises(ValidationError) as caught:
        config("env: {OK_1: x, 1BAD: y, 'A-B': z}\n")
    bad = {e["input"] for e in caught.value.errors()}
    assert bad == {"1BAD", "A-B"}


def test_settings_defaults_are_the_contract_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert (s.manifests, s.state_dir, s.base_dir) == (Path("manifests"), Path(".agentctl"), tmp_path)
    assert (s.metrics_addr, s.resync, s.max_agents, s.stop_agents_on_exit) == ("127.0.0.1:9478", 30.0, None, False)
    assert (s.log_dir, s.status_dir) == (Path(".agentctl/logs"), Path(".agentctl/status"))


@pytest.mark.parametrize(("text", "size"), [
    ("104857600", 104857600), ("100Mi", 100 << 20), ("1G", 10**9), ("64ki", 64 << 10), ("5MiB", 5 << 20),
])
def test_sizes_parse_with_optional_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5Mi", "10 apples", "Mi"])
def test_bad_sizes_are_rejected_by_value(text: str) -> None:
    with pytest.raises(ValueError, match="not a positive number of bytes"):
        parse_size(text)


def test_git_max_bytes_defaults_to_100_mib_and_is_a_config_key() -> None:
    assert GitSource(url="x").max_bytes == GIT_MAX_BYTES == 100 << 20
    cfg = config("git: {url: /srv/repo.git, path: agents, maxBytes: 1048576}\n")
    source = cfg.git_source()
    assert source is not None and source.max_bytes == 1 << 20
    assert config("gitUrl: /srv/repo.git\ngitMaxBytes: 2048\n").git_max_bytes == 2048
    with pytest.raises(ValidationError):
        config("git: {url: /srv/repo.git, maxBytes: 0}\n")
