"""agent_phase: the phase, readiness and Ready reason users see for each situation of CONTRACT §4."""

from __future__ import annotations

import pytest

from controller.desired import DesiredAgent
from controller.model import ExitReason, InstanceRecord, Phase
from controller.planner import AgentView, PhaseView, agent_phase
from tests.unit.builders import desired, exited, running, stopping

ONE = desired()
TWO = desired(replicas=2)
OLD = desired(command=["python3", "old.py"])


def phase_of(agent: DesiredAgent | None, *records: InstanceRecord, ever_valid: bool = True,
             pending_reason: str | None = None, unavailable: str | None = None) -> PhaseView:
    view = AgentView("reviewer", agent, {r.id: r for r in records}, unavailable=unavailable)
    return agent_phase(view, ever_valid=ever_valid, pending_reason=pending_reason)


def summary(pv: PhaseView) -> tuple[str, int, int, str]:
    return pv.phase.value, pv.ready, pv.desired, pv.reason


CASES: list[tuple[str, PhaseView, tuple[str, int, int, str]]] = [
    ("nothing started yet", phase_of(ONE), ("Pending", 0, 1, "Pending")),
    ("waiting for host capacity", phase_of(TWO, running(TWO.instances[0]), pending_reason="HostCapacity"),
     ("Pending", 1, 2, "HostCapacity")),
    ("one of two replicas still to start", phase_of(TWO, running(TWO.instances[0])),
     ("Starting", 1, 2, "Starting")),
    ("exited for a spec change, new spec about to start",
     phase_of(ONE, exited(OLD.instances[0], ExitReason.SPEC_CHANGED)), ("Starting", 0, 1, "Starting")),
    ("all replicas run the current spec", phase_of(TWO, *(running(i) for i in TWO.instances)),
     ("Running", 2, 2, "Running")),
    ("a replica waits in backoff", phase_of(TWO, running(TWO.instances[0]),
                                            exited(TWO.instances[1], next_start=5.0)),
     ("BackOff", 1, 2, "BackOff")),
    ("old spec being stopped", phase_of(ONE, stopping(OLD.instances[0], deadline=5.0)),
     ("Stopping", 0, 1, "Restarting")),
    ("deleted, instance still stopping", phase_of(None, stopping(ONE.instances[0], deadline=5.0)),
     ("Stopping", 0, 0, ExitReason.MANIFEST_DELETED)),
    ("deleted, nothing left", phase_of(None), ("Stopped", 0, 0, ExitReason.MANIFEST_DELETED)),
    ("scaled to zero", phase_of(desired(replicas=0)), ("Stopped", 0, 0, "ScaledToZero")),
    ("scaled to zero, instance still stopping", phase_of(desired(replicas=0), stopping(ONE.instances[0], deadline=5.0)),
     ("Stopping", 0, 0, "ScaledToZero")),
    ("ran to completion", phase_of(ONE, exited(ONE.instances[0], ExitReason.COMPLETED, code=0, terminal="Completed")),
     ("Completed", 0, 1, "Completed")),
    ("failed under Never", phase_of(ONE, exited(ONE.instances[0], terminal="Failed", terminal_reason="Failed")),
     ("Failed", 0, 1, "Failed")),
    ("suspended, instance still stopping", phase_of(desired(suspend=True), stopping(ONE.instances[0], deadline=5.0)),
     ("Stopping", 0, 0, "Suspended")),
    ("suspended and stopped", phase_of(desired(suspend=True)), ("Suspended", 0, 0, "Suspended")),
    ("never had a valid spec", phase_of(None, ever_valid=False), ("Invalid", 0, 0, "InvalidManifest")),
]


@pytest.mark.parametrize(("situation", "pv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_phase_describes_the_instances(situation: str, pv: PhaseView, expected: tuple[str, int, int, str]) -> None:
    assert summary(pv) == expected


def test_every_contract_phase_is_reachable() -> None:
    assert {c[1].phase for c in CASES} == set(Phase)


def test_crash_loop_shows_failed_with_the_reason_and_message() -> None:
    rec = exited(ONE.instances[0], terminal="Failed", terminal_reason="CrashLoop",
                 terminal_message="more than 3 restarts within 60s")
    pv = phase_of(ONE, rec)
    assert (pv.phase, pv.reason, pv.message) == (Phase.FAILED, "CrashLoop", "more than 3 restarts within 60s")


def test_one_failed_replica_fails_the_agent_even_if_others_run() -> None:
    pv = phase_of(TWO, running(TWO.instances[0]), exited(TWO.instances[1], terminal="Failed", terminal_reason="Failed"))
    assert summary(pv) == ("Failed", 1, 2, "Failed")


def test_finished_instance_of_an_older_spec_does_not_decide_the_phase() -> None:
    pv = phase_of(ONE, exited(OLD.instances[0], terminal="Failed", terminal_reason="CrashLoop"))
    assert pv.phase == Phase.STARTING


def test_unavailable_supervisor_shows_pending_with_the_reason() -> None:
    pv = phase_of(desired(supervisor="systemd"), unavailable="no systemd user manager")
    assert summary(pv) == ("Pending", 0, 1, "SupervisorUnavailable")
    assert pv.message == "no systemd user manager"


def test_instance_with_a_failed_health_check_is_not_ready() -> None:
    pv = phase_of(ONE, running(ONE.instances[0], health=ExitReason.LIVENESS_FAILED))
    assert (pv.phase, pv.ready) == (Phase.STARTING, 0)


def test_instance_running_an_old_spec_is_not_counted_ready() -> None:
    assert phase_of(ONE, running(OLD.instances[0])).ready == 0


def test_replica_that_completed_under_on_failure_leaves_the_rest_running() -> None:
    pv = phase_of(TWO, running(TWO.instances[0]),
                  exited(TWO.instances[1], terminal="Completed", terminal_reason="Completed"))
    assert summary(pv) == ("Running", 1, 2, "Running")
