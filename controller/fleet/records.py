"""The fleet's keys under /agentctl/<fleet>/ and the JSON records stored at them.

Model layer: pure encoders and decoders shared by the coordinator, `agentctl drain` and the
tests. A record that does not decode is treated as absent, never as a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from controller.fleet.assign import UNLIMITED, HostInfo


@dataclass(frozen=True)
class Entry:
    """One key as etcd returned it."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Keys:
    fleet: str

    @property
    def root(self) -> str:
        return f"/agentctl/{self.fleet}/"

    @property
    def hosts(self) -> str:
        return self.root + "hosts/"  # one per live host, on its lease

    @property
    def drained(self) -> str:
        return self.root + "drained/"  # `agentctl drain HOST`, no lease: kept until uncordon

    @property
    def leader(self) -> str:
        return self.root + "leader"  # the assigning host, on its lease

    @property
    def assignments(self) -> str:
        return self.root + "assignments"  # one JSON map instance -> host, written by the leader

    @property
    def owners(self) -> str:
        return self.root + "owners/"  # per instance, on the owning host's lease

    @property
    def status(self) -> str:
        return self.root + "status/"  # per host, on its lease: what its instances do

    def host(self, name: str) -> str:
        return self.hosts + name

    def drain(self, name: str) -> str:
        return self.drained + name

    def owner(self, instance: str) -> str:
        return self.owners + instance

    def host_status(self, name: str) -> str:
        return self.status + name


@dataclass(frozen=True)
class HostRecord:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    capacity: int | None = None
    running: int = 0
    revision: str | None = None  # the source revision this host applies
    controller_id: str = ""

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "labels": self.labels, "capacity": self.capacity,
                           "running": self.running, "revision": self.revision,
                           "controllerId": self.controller_id}, sort_keys=True).encode()

    def info(self, *, cordoned: bool) -> HostInfo:
        return HostInfo(self.name, dict(self.labels), UNLIMITED if self.capacity is None else self.capacity, cordoned)


def _load(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def decode_host(raw: bytes) -> HostRecord | None:
    data = _load(raw)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    raw_labels = data.get("labels")
    labels: dict[Any, Any] = raw_labels if isinstance(raw_labels, dict) else {}
    capacity = data.get("capacity") if isinstance(data.get("capacity"), int) else None
    return HostRecord(data["name"], {str(k): str(v) for k, v in labels.items()}, capacity,
                      int(data.get("running") or 0), data.get("revision"), str(data.get("controllerId") or ""))


@dataclass(frozen=True)
class Owner:
    """Who holds an instance. The key's mod revision is the fencing token of its latest start:
    every start rewrites the key, and etcd's revision only grows."""

    host: str

    def encode(self) -> bytes:
        return json.dumps({"host": self.host}).encode()


def decode_owner(raw: bytes) -> Owner | None:
    data = _load(raw)
    if not isinstance(data, dict) or not isinstance(data.get("host"), str):
        return None
    return Owner(data["host"])


def encode_map(mapping: dict[str, Any]) -> bytes:
    return json.dumps(mapping, sort_keys=True).encode()


def decode_map(raw: bytes) -> dict[str, Any]:
    data = _load(raw)
    return data if isinstance(data, dict) else {}


@dataclass
class View:
    """One read of every key of the fleet."""

    hosts: dict[str, HostRecord] = field(default_factory=dict)  # live hosts only (records on a lease)
    drained: set[str] = field(default_factory=set)
    leader: str | None = None
    leader_entry: Entry | None = None
    assignments: dict[str, str] = field(default_factory=dict)
    owners: dict[str, tuple[str, Entry]] = field(default_factory=dict)  # instance -> (host, entry)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> instance -> summary


def parse_view(keys: Keys, entries: list[Entry]) -> View:
    v = View()
    for e in entries:
        if e.key.startswith(keys.hosts) and e.lease:
            rec = decode_host(e.value)
            if rec is not None:
                v.hosts[rec.name] = rec
        elif e.key.startswith(keys.drained):
            v.drained.add(e.key[len(keys.drained):])
        elif e.key == keys.leader:
            v.leader, v.leader_entry = e.value.decode(errors="replace"), e
        elif e.key == keys.assignments:
            v.assignments = {str(a): str(b) for a, b in decode_map(e.value).items()}
        elif e.key.startswith(keys.owners):
            owner = decode_owner(e.value)
            if owner is not None:
                v.owners[e.key[len(keys.owners):]] = (owner.host, e)
        elif e.key.startswith(keys.status):
            v.statuses[e.key[len(keys.status):]] = decode_map(e.value)
    return v
