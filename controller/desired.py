"""What should run: DesiredAgent values computed from loaded manifests and controller settings.

Pure: the spec hash, instance ids, argv and env (CONTRACT §6) come from values already
read by `loader`; nothing here touches the file system, the clock or a process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from controller.manifests import AgentManifest, Loaded, signal_number
from controller.model import InstanceSpec
from controller.providers import Preset, field_env, render, resumes


@dataclass(frozen=True)
class DesiredAgent:
    name: str
    source: str
    manifest: AgentManifest
    spec_hash: str
    instances: tuple[InstanceSpec, ...]

    @property
    def spec(self):  # type: ignore[no-untyped-def]
        return self.manifest.spec

    @property
    def stop_signal(self) -> int:
        return signal_number(self.manifest.spec.stop.signal)


def argv_and_env(loaded: Loaded, presets: Mapping[str, Preset]) -> tuple[list[str], dict[str, str]]:
    spec = loaded.manifest.spec
    if spec.provider is None:
        return list(spec.command or ()), {}
    return render(presets[spec.provider], spec)


def spec_hash(shaping: Mapping[str, object]) -> str:
    canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def desire(loaded: Loaded, *, presets: Mapping[str, Preset], default_env: Mapping[str, str],
           log_dir: str) -> DesiredAgent:
    """One manifest -> its instances. Only fields that shape the process enter the hash."""
    spec = loaded.manifest.spec
    argv, preset_env = argv_and_env(loaded, presets)
    # precedence, lowest first: controller default env, preset, envFiles, manifest env, provider fields
    env = {**default_env, **preset_env, **dict(loaded.env_from_files), **spec.env, **field_env(spec)}
    shaping = {
        "argv": argv,
        "env": env,
        "cwd": loaded.cwd,
        "supervisor": spec.supervisor,
        "resources": spec.resources.model_dump(by_alias=True),
    }
    if resumes(spec):  # only when set: the hash of every spec without it stays what it was
        shaping["session"] = {"resume": True}
    digest = spec_hash(shaping)
    name = loaded.name
    instances = tuple(
        InstanceSpec(
            id=f"{name}-{i}",
            agent=name,
            index=i,
            supervisor=spec.supervisor,
            argv=tuple(argv),
            env=tuple(sorted({
                **env,
                "AGENTCTL_AGENT": name,
                "AGENTCTL_INSTANCE": f"{name}-{i}",
                "AGENTCTL_SPEC_HASH": digest,
                "AGENTCTL_LOG_FILE": f"{log_dir}/{name}-{i}.log",
            }.items())),
            cwd=loaded.cwd,
            spec_hash=digest,
        )
        for i in range(spec.replicas)
    )
    return DesiredAgent(name, loaded.source, loaded.manifest, digest, instances)


def placed_here(manifest: AgentManifest, host_name: str, host_labels: Mapping[str, str]) -> bool:
    """CONTRACT §7: no placement, or every given condition matches this host."""
    placement = manifest.spec.placement
    if placement is None:
        return True
    if placement.hosts is not None and host_name not in placement.hosts:
        return False
    if placement.host_labels is not None:
        return all(host_labels.get(k) == v for k, v in placement.host_labels.items())
    return True
