"""The planner as a table: (desired agent, instance records, fake `now`) -> actions and requeue."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.desired import DesiredAgent
from controller.model import (
    ExitReason,
    Finish,
    Forget,
    InstanceRecord,
    Kill,
    Plan,
    Schedule,
    Start,
    Stop,
    Wait,
)
from controller.planner import AgentView, plan_agent
from tests.unit.builders import desired, exit_info, exited, running, stopping

NOW = 10_000.0  # the fake monotonic clock
SIGTERM, SIGINT = 15, 2


def plan(agent: DesiredAgent | None, *records: InstanceRecord, now: float = NOW, capacity: int = 1 << 30,
         unavailable: str | None = None, gone_reason: str = ExitReason.MANIFEST_DELETED) -> Plan:
    view = AgentView("reviewer", agent, {r.id: r for r in records}, gone_reason=gone_reason,
                     unavailable=unavailable, last_signal=SIGINT, last_grace=7.0)
    return plan_agent(view, now, capacity=capacity)


def starts(p: Plan) -> list[Start]:
    return [a for a in p.actions if isinstance(a, Start)]


def old_and_new() -> tuple[DesiredAgent, DesiredAgent]:
    old = desired(command=["python3", "old.py"], stop={"signal": "SIGINT", "gracePeriodSeconds": 5})
    new = desired(command=["python3", "new.py"], stop={"signal": "SIGINT", "gracePeriodSeconds": 5})
    assert old.spec_hash != new.spec_hash
    return old, new


# -- creating and keeping ---------------------------------------------------------------

def test_new_agent_starts_every_replica_as_created() -> None:
    agent = desired(replicas=3)
    p = plan(agent)
    assert [(s.spec.id, s.reason, s.counts_as_restart) for s in starts(p)] == [
        ("reviewer-0", "Created", False), ("reviewer-1", "Created", False), ("reviewer-2", "Created", False)]
    assert [s.spec for s in starts(p)] == list(agent.instances)
    assert len(p.actions) == 3 and p.requeue_after is None and p.pending_reason is None


def test_running_instance_of_the_current_spec_is_left_alone() -> None:
    agent = desired(replicas=2)
    p = plan(agent, *(running(i) for i in agent.instances))
    assert p.actions == (Wait("reviewer-0", "UpToDate"), Wait("reviewer-1", "UpToDate"))
    assert p.requeue_after is None


def test_missing_replica_is_started_beside_running_ones() -> None:
    agent = desired(replicas=2)
    p = plan(agent, running(agent.instances[0]))
    assert Wait("reviewer-0", "UpToDate") in p.actions
    assert [(s.spec.id, s.reason) for s in starts(p)] == [("reviewer-1", "Created")]


# -- spec changes: stop before start ----------------------------------------------------

def test_changed_spec_stops_before_starting() -> None:
    old, new = old_and_new()
    p = plan(new, running(old.instances[0]))
    assert p.actions == (Stop("reviewer-0", ExitReason.SPEC_CHANGED, SIGINT, 5.0),)
    assert starts(p) == []


def test_changed_spec_starts_nothing_while_the_old_instance_is_still_stopping() -> None:
    old, new = old_and_new()
    p = plan(new, stopping(old.instances[0], deadline=NOW + 3))
    assert p.actions == () and p.requeue_after == 3.0


def test_instance_that_exited_for_a_spec_change_starts_at_once_without_backoff() -> None:
    old, new = old_and_new()
    p = plan(new, exited(old.instances[0], ExitReason.SPEC_CHANGED, code=None, failures_in_row=4))
    assert [(s.spec, s.reason, s.counts_as_restart) for s in starts(p)] == [
        (new.instances[0], ExitReason.SPEC_CHANGED, False)]
    assert not any(isinstance(a, Schedule) for a in p.actions)


def test_spec_reverted_while_stopping_starts_again_at_once() -> None:
    agent = desired()
    p = plan(agent, exited(agent.instances[0], ExitReason.SPEC_CHANGED, code=None))
    assert [(s.reason, s.counts_as_restart) for s in starts(p)] == [(ExitReason.SPEC_CHANGED, False)]


def test_changed_spec_clears_a_failed_instance() -> None:
    old, new = old_and_new()
    failed = exited(old.instances[0], terminal="Failed", terminal_reason="CrashLoop")
    assert [s.spec for s in starts(plan(new, failed))] == [new.instances[0]]


def test_changed_spec_restarts_an_instance_waiting_in_backoff_at_once() -> None:
    old, new = old_and_new()
    waiting = exited(old.instances[0], failures_in_row=5, next_start=NOW + 200)
    p = plan(new, waiting)
    assert [(s.spec, s.reason) for s in starts(p)] == [(new.instances[0], ExitReason.SPEC_CHANGED)]


@pytest.mark.parametrize("reason", [
    pytest.param(ExitReason.MANIFEST_DELETED, id="deleted"),
    pytest.param(ExitReason.SCALED_DOWN, id="scaled-down"),
    pytest.param(ExitReason.SUSPENDED, id="suspended"),
    pytest.param(ExitReason.SPEC_CHANGED, id="spec-changed"),
    pytest.param(ExitReason.LIVENESS_FAILED, id="liveness"),
])
def test_every_stop_requeues_at_the_end_of_its_grace_period(reason: str) -> None:
    old, new = old_and_new()
    rec = running(old.instances[0])
    if reason == ExitReason.MANIFEST_DELETED:
        p = plan(None, rec)
    elif reason == ExitReason.SCALED_DOWN:
        p = plan(desired(command=["python3", "old.py"], replicas=0,
                         stop={"signal": "SIGINT", "gracePeriodSeconds": 5}), rec)
    elif reason == ExitReason.SUSPENDED:
        p = plan(desired(command=["python3", "old.py"], suspend=True,
                         stop={"signal": "SIGINT", "gracePeriodSeconds": 5}), rec)
    elif reason == ExitReason.SPEC_CHANGED:
        p = plan(new, rec)
    else:
        p = plan(old, replace(rec, health=reason))
    stops = [a for a in p.actions if isinstance(a, Stop)]
    assert [s.reason for s in stops] == [reason]
    assert p.requeue_after == stops[0].grace


# -- crashes and backoff -----------------------------------------------------------------

@pytest.mark.parametrize(("n", "delay"), [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (6, 30.0), (60, 30.0)])
def test_crash_waits_initial_times_two_to_the_n_minus_one_capped_at_max(n: int, delay: float) -> None:
    agent = desired(backoff={"initialSeconds": 2, "maxSeconds": 30})
    p = plan(agent, exited(agent.instances[0], failures_in_row=n - 1, runtime=1.0))
    assert p.actions == (Schedule("reviewer-0", NOW + delay, delay, n),)
    assert p.requeue_after == delay


def test_waiting_in_backoff_requeues_for_the_remaining_delay() -> None:
    agent = desired()
    p = plan(agent, exited(agent.instances[0], failures_in_row=3, next_start=NOW + 7.5))
    assert p.actions == (Wait("reviewer-0", "BackOff"),)
    assert p.requeue_after == 7.5


@pytest.mark.parametrize("late", [0.0, 3.0])
def test_due_backoff_starts_again_counted_as_a_restart(late: float) -> None:
    agent = desired()
    p = plan(agent, exited(agent.instances[0], failures_in_row=2, next_start=NOW - late))
    assert [(s.spec, s.reason, s.counts_as_restart) for s in starts(p)] == [
        (agent.instances[0], "BackOffExpired", True)]


@pytest.mark.parametrize(("runtime", "attempt", "delay"), [(599.9, 6, 32.0), (600.0, 1, 1.0), (5000.0, 1, 1.0)])
def test_failure_count_resets_once_the_last_run_lasted_reset_after_seconds(
        runtime: float, attempt: int, delay: float) -> None:
    agent = desired(backoff={"initialSeconds": 1, "maxSeconds": 300, "resetAfterSeconds": 600})
    p = plan(agent, exited(agent.instances[0], failures_in_row=5, runtime=runtime))
    assert p.actions == (Schedule("reviewer-0", NOW + delay, delay, attempt),)


def test_zero_initial_backoff_restarts_in_the_same_pass() -> None:
    agent = desired(backoff={"initialSeconds": 0})
    p = plan(agent, exited(agent.instances[0]))
    assert p.actions[0] == Schedule("reviewer-0", NOW, 0.0, 1)
    assert [(s.reason, s.counts_as_restart) for s in starts(p)] == [("Restarted", True)]


def test_clean_exit_under_always_is_restarted_with_backoff() -> None:
    agent = desired(restartPolicy="Always")
    p = plan(agent, exited(agent.instances[0], ExitReason.COMPLETED, code=0))
    assert p.actions == (Schedule("reviewer-0", NOW + 1.0, 1.0, 1),)


@pytest.mark.parametrize(("policy", "reason", "code", "expected"), [
    ("OnFailure", ExitReason.COMPLETED, 0, Finish("reviewer-0", "Completed", "Completed")),
    ("OnFailure", ExitReason.ERROR, 1, Schedule("reviewer-0", NOW + 1.0, 1.0, 1)),
    ("OnFailure", ExitReason.LOST, None, Schedule("reviewer-0", NOW + 1.0, 1.0, 1)),
    ("OnFailure", ExitReason.SIGNALED, None, Schedule("reviewer-0", NOW + 1.0, 1.0, 1)),
    ("Never", ExitReason.COMPLETED, 0, Finish("reviewer-0", "Completed", "Completed")),
    ("Never", ExitReason.ERROR, 1, Finish("reviewer-0", "Failed", "Failed")),
    ("Never", ExitReason.LOST, None, Finish("reviewer-0", "Failed", "Failed")),
])
def test_restart_policy_decides_what_follows_an_exit(policy: str, reason: str, code: int | None,
                                                     expected: object) -> None:
    agent = desired(restartPolicy=policy)
    p = plan(agent, exited(agent.instances[0], reason, code=code))
    assert p.actions == (expected,)


def test_liveness_kill_follows_the_restart_policy_with_backoff() -> None:
    agent = desired()
    p = plan(agent, exited(agent.instances[0], ExitReason.LIVENESS_FAILED, code=None, failures_in_row=1))
    assert p.actions == (Schedule("reviewer-0", NOW + 2.0, 2.0, 2),)


def test_finished_instance_stays_finished() -> None:
    agent = desired(restartPolicy="Never")
    for terminal in ("Completed", "Failed"):
        p = plan(agent, exited(agent.instances[0], terminal=terminal, terminal_reason=terminal))
        assert p.actions == (Wait("reviewer-0", terminal),)
        assert p.requeue_after is None


# -- maxRestarts --------------------------------------------------------------------------

def test_exit_that_would_exceed_max_restarts_in_the_window_fails_with_crash_loop() -> None:
    agent = desired(maxRestarts={"count": 3, "windowSeconds": 60})
    times = (NOW - 50, NOW - 20, NOW - 1)
    p = plan(agent, exited(agent.instances[0], failures_in_row=3, restart_times=times))
    assert len(p.actions) == 1
    finish = p.actions[0]
    assert isinstance(finish, Finish)
    assert (finish.instance, finish.phase, finish.reason) == ("reviewer-0", "Failed", "CrashLoop")
    assert "3" in finish.message and "60" in finish.message


def test_restarts_outside_the_window_do_not_count_toward_max_restarts() -> None:
    agent = desired(maxRestarts={"count": 3, "windowSeconds": 60})
    times = (NOW - 500, NOW - 200, NOW - 60, NOW - 30, NOW - 1)  # exactly 60 s ago is outside
    p = plan(agent, exited(agent.instances[0], failures_in_row=2, restart_times=times))
    assert p.actions == (Schedule("reviewer-0", NOW + 4.0, 4.0, 3),)


def test_max_restarts_zero_fails_on_the_first_crash() -> None:
    agent = desired(maxRestarts={"count": 0, "windowSeconds": 60})
    p = plan(agent, exited(agent.instances[0]))
    assert [(a.phase, a.reason) for a in p.actions if isinstance(a, Finish)] == [("Failed", "CrashLoop")]


def test_max_restarts_never_fails_a_clean_exit_under_on_failure() -> None:
    agent = desired(restartPolicy="OnFailure", maxRestarts={"count": 0, "windowSeconds": 60})
    p = plan(agent, exited(agent.instances[0], ExitReason.COMPLETED, code=0))
    assert p.actions == (Finish("reviewer-0", "Completed", "Completed"),)


# -- stopping and killing ----------------------------------------------------------------

def test_stopping_instance_past_its_grace_deadline_is_killed() -> None:
    agent = desired()
    for deadline in (NOW, NOW - 30):
        p = plan(agent, stopping(agent.instances[0], deadline=deadline))
        assert p.actions == (Kill("reviewer-0"),)


def test_stopping_instance_before_its_deadline_requeues_at_the_deadline() -> None:
    agent = desired()
    p = plan(agent, stopping(agent.instances[0], deadline=NOW + 4.0))
    assert p.actions == ()
    assert p.requeue_after == 4.0


def test_killed_instance_is_not_killed_twice() -> None:
    agent = desired()
    p = plan(agent, stopping(agent.instances[0], deadline=NOW - 5, killed=True))
    assert p.actions == ()


def test_stopping_instance_of_a_deleted_agent_is_killed_after_its_deadline() -> None:
    agent = desired()
    assert plan(None, stopping(agent.instances[0], deadline=NOW - 1)).actions == (Kill("reviewer-0"),)
    assert plan(None, stopping(agent.instances[0], deadline=NOW + 2)).requeue_after == 2.0


# -- deletion, scale down, suspend, placement --------------------------------------------

def test_deleted_agent_stops_running_instances_with_its_last_stop_settings() -> None:
    agent = desired(replicas=2)
    p = plan(None, running(agent.instances[0]), running(agent.instances[1]))
    assert sorted(p.actions, key=str) == [Stop("reviewer-0", ExitReason.MANIFEST_DELETED, SIGINT, 7.0),
                                          Stop("reviewer-1", ExitReason.MANIFEST_DELETED, SIGINT, 7.0)]
    assert not starts(p)


def test_deleted_agent_forgets_instances_that_are_gone() -> None:
    agent = desired()
    p = plan(None, exited(agent.instances[0], ExitReason.MANIFEST_DELETED))
    assert p.actions == (Forget("reviewer-0"),)


def test_agent_placed_elsewhere_stops_with_reason_not_placed() -> None:
    agent = desired()
    p = plan(None, running(agent.instances[0]), gone_reason=ExitReason.NOT_PLACED)
    assert [(a.instance, a.reason) for a in p.actions if isinstance(a, Stop)] == [("reviewer-0", "NotPlaced")]


def test_scale_down_stops_the_highest_index_first_and_leaves_the_rest() -> None:
    three = desired(replicas=3)
    one = desired(replicas=1)
    assert one.spec_hash == three.spec_hash
    p = plan(one, *(running(i) for i in three.instances))
    assert p.actions == (
        Stop("reviewer-2", ExitReason.SCALED_DOWN, SIGTERM, 10.0),
        Stop("reviewer-1", ExitReason.SCALED_DOWN, SIGTERM, 10.0),
        Wait("reviewer-0", "UpToDate"),
    )


def test_scale_down_forgets_surplus_slots_that_already_exited() -> None:
    two = desired(replicas=2)
    p = plan(desired(replicas=1), running(two.instances[0]), exited(two.instances[1]))
    assert Forget("reviewer-1") in p.actions and not starts(p)


def test_suspend_stops_every_instance_and_starts_none() -> None:
    agent = desired(replicas=2, suspend=True)
    p = plan(agent, running(agent.instances[0]), running(agent.instances[1]))
    assert sorted(p.actions, key=str) == [Stop("reviewer-0", ExitReason.SUSPENDED, SIGTERM, 10.0),
                                          Stop("reviewer-1", ExitReason.SUSPENDED, SIGTERM, 10.0)]
    assert plan(agent).actions == ()


def test_suspended_agent_keeps_no_exited_records() -> None:
    agent = desired(suspend=True)
    p = plan(agent, exited(agent.instances[0], ExitReason.SUSPENDED))
    assert p.actions == (Forget("reviewer-0"),)


@pytest.mark.parametrize("reason", [ExitReason.SUSPENDED, ExitReason.SCALED_DOWN, ExitReason.MANIFEST_DELETED,
                                    ExitReason.NOT_PLACED])
@pytest.mark.parametrize("policy", ["Always", "Never"])
def test_instance_stopped_on_purpose_and_wanted_again_starts_at_once_uncounted(reason: str, policy: str) -> None:
    agent = desired(restartPolicy=policy)
    p = plan(agent, exited(agent.instances[0], reason, code=None, runtime=2.0))
    assert [(s.spec, s.counts_as_restart) for s in starts(p)] == [(agent.instances[0], False)]


# -- capacity and unavailable supervisors -------------------------------------------------

def test_no_host_capacity_waits_and_says_why() -> None:
    agent = desired()
    p = plan(agent, capacity=0)
    assert p.actions == (Wait("reviewer-0", "HostCapacity"),)
    assert p.pending_reason == "HostCapacity"


def test_partial_host_capacity_starts_only_as_many_as_fit() -> None:
    agent = desired(replicas=3)
    p = plan(agent, capacity=1)
    assert [s.spec.id for s in starts(p)] == ["reviewer-0"]
    assert [a for a in p.actions if isinstance(a, Wait)] == [Wait("reviewer-1", "HostCapacity"),
                                                             Wait("reviewer-2", "HostCapacity")]
    assert p.pending_reason == "HostCapacity"


def test_due_backoff_without_capacity_waits_instead_of_starting() -> None:
    agent = desired()
    p = plan(agent, exited(agent.instances[0], next_start=NOW - 1), capacity=0)
    assert p.actions == (Wait("reviewer-0", "HostCapacity"),)


def test_unavailable_supervisor_waits_and_disturbs_nothing() -> None:
    agent = desired(replicas=2, supervisor="tmux")
    p = plan(agent, running(agent.instances[0]), unavailable="tmux not found")
    assert p.actions == (Wait("reviewer-0", "UpToDate"), Wait("reviewer-1", "SupervisorUnavailable"))
    assert p.pending_reason == "SupervisorUnavailable"


# -- health checks and manual restarts ---------------------------------------------------

@pytest.mark.parametrize("reason", [ExitReason.LIVENESS_FAILED, ExitReason.MEMORY_LIMIT_EXCEEDED,
                                    ExitReason.MANUAL_RESTART])
def test_failed_health_check_or_restart_request_stops_a_running_instance(reason: str) -> None:
    agent = desired(stop={"signal": "SIGINT", "gracePeriodSeconds": 3})
    p = plan(agent, running(agent.instances[0], health=reason))
    assert p.actions == (Stop("reviewer-0", reason, SIGINT, 3.0),)


def test_instance_stopped_for_a_manual_restart_starts_again_at_once_counted() -> None:
    agent = desired()
    p = plan(agent, exited(agent.instances[0], ExitReason.MANUAL_RESTART, code=None, failures_in_row=3))
    assert [(s.reason, s.counts_as_restart) for s in starts(p)] == [(ExitReason.MANUAL_RESTART, True)]
    assert not any(isinstance(a, Schedule) for a in p.actions)


@pytest.mark.parametrize("terminal", ["Failed", "Completed"])
def test_manual_restart_starts_a_finished_instance(terminal: str) -> None:
    agent = desired(restartPolicy="Never")
    rec = exited(agent.instances[0], terminal=terminal, terminal_reason="CrashLoop", health=ExitReason.MANUAL_RESTART)
    p = plan(agent, rec)
    assert [(s.spec, s.reason, s.counts_as_restart) for s in starts(p)] == [
        (agent.instances[0], ExitReason.MANUAL_RESTART, True)]


def test_manual_restart_skips_a_pending_backoff() -> None:
    agent = desired()
    rec = exited(agent.instances[0], next_start=NOW + 100, health=ExitReason.MANUAL_RESTART)
    assert [s.reason for s in starts(plan(agent, rec))] == [ExitReason.MANUAL_RESTART]



def test_switching_to_an_unavailable_supervisor_keeps_the_old_instance_running() -> None:
    agent = desired(supervisor="tmux")
    old = running(agent.instances[0], spec_hash="sha256:old")
    plan = plan_agent(AgentView(agent.name, agent, {old.id: old}, unavailable="tmux is not installed"), NOW)
    assert not [a for a in plan.actions if isinstance(a, (Stop, Start, Kill))]
    assert plan.pending_reason == "SupervisorUnavailable"


def test_instance_stopped_with_the_controller_keeps_its_record_and_starts_uncounted_next_time() -> None:
    agent = desired()
    rec = exited(agent.instances[0], last_exit=exit_info(ExitReason.CONTROLLER_STOPPED, code=None))
    halted = plan_agent(AgentView(agent.name, None, {rec.id: rec}, gone_reason=ExitReason.CONTROLLER_STOPPED), NOW)
    assert not [a for a in halted.actions if isinstance(a, Forget)]
    again = plan_agent(AgentView(agent.name, agent, {rec.id: rec}), NOW)
    assert [(type(a), a.counts_as_restart) for a in again.actions if isinstance(a, Start)] == [(Start, False)]
