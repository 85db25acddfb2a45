"""/metrics re-renders only the agents whose status or restart counts changed: what a scrape
returns after any sequence of snapshots equals a fresh render of the last one."""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import Metrics
from controller.model import Handle
from controller.reconciler import Snapshot


class NoUsage:
    def get(self, handles: Any, agents: frozenset[str]) -> dict[str, tuple[int, float]]:
        return {a: (4096, 0.5) for a in agents}


def doc(name: str, phase: str = "Running", ready: int = 1) -> dict[str, Any]:
    return {"name": name, "source": f"m/{name}.yaml", "phase": phase, "specHash": f"sha256:{name}",
            "supervisor": "process", "replicas": {"desired": 1, "ready": ready}, "instances": []}


def fresh(snap: Snapshot) -> bytes:
    return Metrics(lambda: snap, lambda: 0.0, usage=NoUsage()).render()  # type: ignore[arg-type]


def test_a_scrape_after_changes_equals_a_fresh_render_of_the_last_snapshot() -> None:
    snap = Snapshot(statuses={n: doc(n) for n in ("a", "b", "c")}, counters={("b", "Error"): 2}, ready=True,
                    handles={"a-0": ("a", Handle(pid=1, pgid=1, start_ticks=0))})
    current = [snap]
    metrics = Metrics(lambda: current[0], lambda: 0.0, usage=NoUsage())  # type: ignore[arg-type]
    assert metrics.render() == fresh(snap)
    changes = [
        lambda s: dataclasses.replace(s, statuses={**s.statuses, "b": doc("b", "BackOff", 0)}),  # one status
        lambda s: dataclasses.replace(s, counters={**s.counters, ("c", "Error"): 1, ("c", "Odd\"\\Reason"): 3}),
        lambda s: dataclasses.replace(s, statuses={n: d for n, d in s.statuses.items() if n != "a"}),  # deleted
        lambda s: dataclasses.replace(s, statuses={**s.statuses, "a": doc("a", "Pending", 0)}),  # back again
        lambda s: dataclasses.replace(s),  # same documents, new snapshot
    ]
    for change in changes:
        current[0] = change(current[0])
        body = metrics.render()
        assert body == fresh(current[0])
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        phases = {s.labels["agent"]: s.labels["phase"] for s in families["agentctl_agent_phase"].samples if s.value}
        assert phases == {n: d["phase"] for n, d in current[0].statuses.items()}
