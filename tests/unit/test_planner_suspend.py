"""`agentctl suspend`: the operator's override stops an agent like spec.suspend, with its own reason."""

from __future__ import annotations

from controller.model import ExitReason, Phase, Start, Stop
from controller.planner import AgentView, agent_phase, plan_agent
from tests.unit.builders import desired, exited, running


def test_operator_suspend_stops_every_instance_and_reads_suspended_by_operator() -> None:
    agent = desired("a", replicas=2)
    recs = {i.id: running(i) for i in agent.instances}
    view = AgentView("a", agent, recs, operator_suspended=True)
    plan = plan_agent(view, 100.0)
    assert sorted((a.instance, a.reason) for a in plan.actions if isinstance(a, Stop)) == [
        ("a-0", ExitReason.SUSPENDED), ("a-1", ExitReason.SUSPENDED)]
    stopped = {i.id: exited(i, ExitReason.SUSPENDED, code=None) for i in agent.instances}
    phase = agent_phase(AgentView("a", agent, stopped, operator_suspended=True))
    assert (phase.phase, phase.reason, phase.desired) == (Phase.SUSPENDED, "SuspendedByOperator", 0)


def test_resume_starts_the_suspended_instances_again_without_counting_a_restart() -> None:
    agent = desired("a")
    stopped = {i.id: exited(i, ExitReason.SUSPENDED, code=None) for i in agent.instances}
    plan = plan_agent(AgentView("a", agent, stopped, operator_suspended=False), 100.0)
    starts = [a for a in plan.actions if isinstance(a, Start)]
    assert [(s.spec.id, s.counts_as_restart) for s in starts] == [("a-0", False)]
