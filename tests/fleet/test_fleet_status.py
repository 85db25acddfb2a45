"""The fleet-wide status of one agent (controller.fleet.wiring.fleet_status), from inline docs."""

from __future__ import annotations

from typing import Any

from controller.fleet.wiring import fleet_status


def local_doc(phase: str, ready: int, desired: int, instances: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "w", "phase": phase, "replicas": {"desired": desired, "ready": ready}, "instances": instances,
            "updatedAt": "2026-12-04T10:00:00Z",
            "conditions": [{"type": "Valid", "status": "True", "reason": "Parsed", "message": "",
                            "lastTransitionTime": "x"},
                           {"type": "Ready", "status": "False", "reason": "Running", "message": "",
                            "lastTransitionTime": "x"}]}


def remote(iid: str, host: str, ready: bool = True) -> dict[str, Any]:
    return {"id": iid, "host": host, "state": "running", "ready": ready, "pid": 7, "startedAt": 0.0, "token": 12}


def render(doc: dict[str, Any], others: list[dict[str, Any]], error: str | None = None) -> dict[str, Any]:
    return fleet_status(doc, None, host="a", remote=others, error=error, fleet="f", hosts=2, tokens={"w-0": 9})


def condition(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in doc["conditions"] if c["type"] == kind)


def test_instances_of_every_host_are_listed_with_their_host_and_count_as_ready() -> None:
    doc = render(local_doc("Running", 1, 2, [{"id": "w-0", "state": "running", "pid": 5}]), [remote("w-1", "b")])
    assert [(i["id"], i["host"]) for i in doc["instances"]] == [("w-0", "a"), ("w-1", "b")]
    assert doc["instances"][0]["fencingToken"] == 9 and doc["instances"][1]["fencingToken"] == 12
    assert doc["replicas"] == {"desired": 2, "ready": 2}
    assert doc["phase"] == "Running" and condition(doc, "Ready")["status"] == "True"
    assert condition(doc, "FleetReady")["status"] == "True"


def test_an_agent_with_nothing_here_and_nothing_anywhere_is_pending_not_completed() -> None:
    doc = render(local_doc("Completed", 0, 1, []), [])
    assert doc["phase"] == "Pending" and condition(doc, "Ready")["reason"] == "Unassigned"


def test_part_of_the_fleet_running_is_starting() -> None:
    doc = render(local_doc("Running", 1, 3, [{"id": "w-0", "state": "running"}]), [remote("w-1", "b", ready=False)])
    assert doc["phase"] == "Starting" and doc["replicas"]["ready"] == 1
    assert condition(doc, "Ready")["status"] == "False"


def test_a_local_failure_is_kept() -> None:
    doc = render(local_doc("Failed", 0, 2, [{"id": "w-0", "state": "exited"}]), [remote("w-1", "b")])
    assert doc["phase"] == "Failed"


def test_etcd_unavailable_shows_in_fleet_ready() -> None:
    doc = render(local_doc("Running", 1, 1, [{"id": "w-0", "state": "running"}]), [], error="etcd unreachable")
    fr = condition(doc, "FleetReady")
    assert (fr["status"], fr["reason"], fr["message"]) == ("False", "EtcdUnavailable", "etcd unreachable")
