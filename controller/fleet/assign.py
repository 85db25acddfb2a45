"""Which host runs which instance: the leader's pure assignment function (CONTRACT §10).

Logic layer: called by the fleet coordinator on the leader only, and by its property tests.
It keeps every assignment that is still valid (stable when nothing changes), and places each
instance without a valid host on the allowed live host with the most free capacity.
Imports nothing that touches the world.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

UNLIMITED = 1 << 30  # a host without --max-agents


@dataclass(frozen=True)
class HostInfo:
    """A live host as its record in etcd describes it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: int = UNLIMITED  # maxAgents
    cordoned: bool = False  # `agentctl drain`: keeps nothing and gets nothing


@dataclass(frozen=True)
class Want:
    """One instance the manifests ask for, with its agent's placement."""

    instance: str
    agent: str
    index: int
    hosts: tuple[str, ...] | None = None  # placement.hosts
    labels: Mapping[str, str] | None = None  # placement.hostLabels


def allows(want: Want, host: HostInfo) -> bool:
    """CONTRACT §7's placement rule, per instance: every given condition must match."""
    if want.hosts is not None and host.name not in want.hosts:
        return False
    if want.labels is not None:
        return all(host.labels.get(k) == v for k, v in want.labels.items())
    return True


def assign(wants: Sequence[Want], hosts: Mapping[str, HostInfo], current: Mapping[str, str]) -> dict[str, str]:
    """instance -> host for every instance that can be placed; an instance left out waits for room."""
    usable = {name: h for name, h in hosts.items() if not h.cordoned}
    load = dict.fromkeys(usable, 0)
    result: dict[str, str] = {}
    ordered = sorted(wants, key=lambda w: (w.agent, w.index, w.instance))
    for w in ordered:  # first keep what still holds: nothing moves without a reason
        host = usable.get(current.get(w.instance, ""))
        if host is not None and allows(w, host) and load[host.name] < host.capacity:
            result[w.instance] = host.name
            load[host.name] += 1
    for w in ordered:
        if w.instance in result:
            continue
        candidates = [h for h in usable.values() if allows(w, h) and load[h.name] < h.capacity]
        if not candidates:
            continue
        # most free capacity first; among equals the least loaded, then by name (deterministic)
        best = min(candidates, key=lambda h: (-(h.capacity - load[h.name]), load[h.name], h.name))
        result[w.instance] = best.name
        load[best.name] += 1
    return result
