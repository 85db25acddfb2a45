"""Activity of AI sessions (CONTRACT §9): classification of recorded screens of the real CLIs,
the per-agent value behind the metric, and what logIdle is allowed to see."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from controller.activity import Activity, Reading, agent_activity, classify, most_urgent, waiting_for_input
from controller.activity_sampler import ActivitySampler, Track
from controller.model import InstanceRecord, RunState

SCREENS = Path(__file__).resolve().parent.parent / "fixtures" / "screens"


def screen(name: str) -> str:
    return (SCREENS / f"{name}.txt").read_text()


@pytest.mark.parametrize(("name", "activity", "reason"), [
    ("claude-trust", Activity.WAITING_FOR_INPUT, "TrustPrompt"),
    ("claude-not-logged-in", Activity.WAITING_FOR_INPUT, "LoginPrompt"),
    ("claude-idle", Activity.IDLE, "Prompt"),
    ("claude-retrying", Activity.UNKNOWN, "Reconnecting"),
    ("claude-offline-exit", Activity.UNKNOWN, "NoMatch"),
    ("codex-login", Activity.WAITING_FOR_INPUT, "LoginPrompt"),
    ("codex-trust", Activity.WAITING_FOR_INPUT, "TrustPrompt"),
    ("codex-idle", Activity.IDLE, "Prompt"),
    ("codex-reconnecting", Activity.UNKNOWN, "Reconnecting"),
])
def test_recorded_screens_of_the_real_clis_are_classified(name: str, activity: Activity, reason: str) -> None:
    reading = classify(screen(name), name.split("-")[0])
    assert (reading.activity, reading.reason) == (activity, reason)


def test_a_working_spinner_is_working_and_reconnecting_is_not() -> None:
    claude = "❯ fix the tests\n✻ Pondering… (12s · ↓ 1.2k tokens · esc to interrupt)\n──\n❯ \n──\n  ⏸ manual mode on"
    assert classify(claude, "claude").activity == Activity.WORKING
    codex = "› fix the tests\n• Working (3s • esc to interrupt)\n› Ask Codex to do anything\n  ? for shortcuts"
    assert classify(codex, "codex").activity == Activity.WORKING
    # the same "esc to interrupt", but codex only retries its connection: no progress
    stalled = codex.replace("Working (3s", "Reconnecting... 2/5 (3s")
    assert classify(stalled, "codex").reason == "Reconnecting"


def test_a_permission_question_waits_for_a_person() -> None:
    claude = ("Bash command\n  rm -rf build\nDo you want to proceed?\n❯ 1. Yes\n  2. No, and tell Claude what to "
              "do differently (esc)")
    assert classify(claude, "claude").activity == Activity.WAITING_FOR_INPUT
    codex = "Would you like to run the following command?\n$ rm -rf build\n› 1. Yes, proceed\n  3. No, and tell Codex what to do differently"
    assert classify(codex, "codex").activity == Activity.WAITING_FOR_INPUT


def test_conversation_text_far_above_the_prompt_does_not_count() -> None:
    old = "Yes, I trust this folder\n" + "".join(f"output line {i}\n" for i in range(40))
    assert classify(old + screen("claude-idle"), "claude").activity == Activity.IDLE


def test_a_provider_without_patterns_is_unknown() -> None:
    assert classify(screen("claude-idle"), "mybot") == Reading(Activity.UNKNOWN, "NoPatterns")


def test_counters_and_spinner_glyphs_are_not_progress_but_new_text_is() -> None:
    base = "› write a poem\n◦ Reconnecting... 3/5 (2s • esc to interrupt)\n› Ask Codex to do anything"
    ticked = base.replace("3/5 (2s", "4/5 (13s").replace("◦", "•")
    assert classify(base, "codex").fingerprint == classify(ticked, "codex").fingerprint
    assert classify(base, "codex").fingerprint != classify(base + "\nThe poem:", "codex").fingerprint
    spin = "❯ go\n✻ Pondering… (3s · esc to interrupt)"
    assert classify(spin, "claude").fingerprint == classify(spin.replace("✻ Pondering… (3s", "✶ Noodling… (9s"),
                                                             "claude").fingerprint


def test_the_agent_shows_its_most_urgent_instance() -> None:
    assert most_urgent(["Idle", "Working", "WaitingForInput"]) == Activity.WAITING_FOR_INPUT
    assert most_urgent(["Idle", "Working"]) == Activity.WORKING
    assert most_urgent(["Idle", "Unknown"]) == Activity.UNKNOWN
    assert most_urgent([]) is None
    doc: dict[str, Any] = {"instances": [{"id": "a-0", "activity": "Idle"}, {"id": "a-1", "activity": "WaitingForInput"}]}
    assert agent_activity(doc) == Activity.WAITING_FOR_INPUT and waiting_for_input(doc)
    assert not waiting_for_input({"instances": [{"id": "a-0", "pid": 5}]})


# -- logIdle: what the sampler lets it see ---------------------------------------------------
def sampler() -> tuple[ActivitySampler, InstanceRecord, Track]:
    controller = SimpleNamespace(activity={}, marked=[], agents={})
    controller.mark = controller.marked.append
    rec = InstanceRecord("a-0", "a", 0, "tmux", "h", RunState.RUNNING, started_mono=100.0, started_at=1000.0)
    s = ActivitySampler(controller)  # type: ignore[arg-type]
    track = s.tracks[rec.id] = Track(rec.started_mono, next_at=0.0, progress=0.0)
    return s, rec, track


def test_before_any_screen_is_read_logidle_goes_by_the_log() -> None:
    s, rec, track = sampler()
    assert s.last_output(rec, 1234.0, 2000.0) == 1234.0


def test_a_session_idle_or_waiting_is_never_idle_killed_and_status_shows_it() -> None:
    s, rec, track = sampler()
    s._apply(rec, track, classify(screen("claude-trust"), "claude"), 50.0)
    assert s.last_output(rec, 0.0, 2000.0) is None
    obs = s.controller.activity["a-0"]
    assert (obs.activity, obs.reason, obs.run) == (Activity.WAITING_FOR_INPUT, "TrustPrompt", 100.0)
    assert s.controller.marked == ["a"]  # type: ignore[attr-defined]
    s._apply(rec, track, classify(screen("claude-idle"), "claude"), 60.0)
    assert s.last_output(rec, 0.0, 2000.0) is None


def test_a_stalled_session_shows_no_progress_while_its_counter_ticks() -> None:
    s, rec, track = sampler()
    first = classify(screen("codex-reconnecting"), "codex")
    s._apply(rec, track, first, 10.0)
    ticked = screen("codex-reconnecting").replace("3/5 (2s", "5/5 (29s")
    s._apply(rec, track, classify(ticked, "codex"), 40.0)
    assert track.progress == 10.0  # the screen changed only in its counter
    s._apply(rec, track, classify(ticked + "\n• The poem is done", "codex"), 45.0)
    assert track.progress == 45.0


def test_a_reading_of_an_earlier_run_is_not_used() -> None:
    s, rec, track = sampler()
    s._apply(rec, track, classify(screen("claude-idle"), "claude"), 10.0)
    later = InstanceRecord("a-0", "a", 0, "tmux", "h", RunState.RUNNING, started_mono=200.0, started_at=1100.0)
    assert s.last_output(later, 1150.0, 2000.0) == 1150.0


# -- status: the fields of CONTRACT §9 ------------------------------------------------------
def test_status_shows_activity_of_running_instances_for_the_run_it_was_seen_in() -> None:
    from controller.activity import Observation
    from controller.model import Phase
    from controller.planner import PhaseView
    from controller.status import Clock, StatusInput, render
    from tests.unit.builders import desired, exited, running

    agent = desired(replicas=3)
    a, b, c = agent.instances
    records = [running(a, started_mono=10.0), running(b, started_mono=20.0), exited(c)]
    seen = {
        a.id: Observation(10.0, Activity.WAITING_FOR_INPUT, "TrustPrompt", 1_790_000_000.0),
        b.id: Observation(5.0, Activity.IDLE, "Prompt", 1_790_000_000.0),  # an earlier run of b
        c.id: Observation(0.0, Activity.WORKING, "Working", 1_790_000_000.0),  # c is not running
    }
    doc = render(StatusInput(name=agent.name, source="m.yaml", phase=PhaseView(Phase.RUNNING, 2, 3, "Running"),
                             spec_hash=agent.spec_hash, instances=records, restarts=0, valid=True, activity=seen),
                 Clock(1_790_000_100.0, 500.0), None)
    first, second, third = doc["instances"]
    assert (first["activity"], first["activityReason"], first["activitySince"]) == (
        "WaitingForInput", "TrustPrompt", "2026-09-21T14:13:20Z")
    assert "activity" not in second and "activity" not in third
    assert waiting_for_input(doc)


# -- the metric -----------------------------------------------------------------------------
def test_the_activity_metric_is_one_hot_per_agent_on_its_most_urgent_instance() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from controller.metrics import Metrics
    from controller.reconciler import Snapshot

    def doc(name: str, *activities: str) -> dict[str, Any]:
        return {"name": name, "phase": "Running", "replicas": {"desired": 1, "ready": 1},
                "instances": [{"id": f"{name}-{i}", "pid": 10 + i, "activity": a} for i, a in enumerate(activities)]}

    snap = Snapshot(statuses={"fleet": doc("fleet", "Idle", "WaitingForInput", "Working"), "solo": doc("solo", "Idle"),
                              "plain": doc("plain")})
    text = Metrics(lambda: snap, lambda: 0).render().decode()
    series = {(s.labels["agent"], s.labels["activity"]): s.value for f in text_string_to_metric_families(text)
              if f.name == "agentctl_agent_activity" for s in f.samples}
    assert {k: v for k, v in series.items() if v == 1} == {("fleet", "WaitingForInput"): 1, ("solo", "Idle"): 1}
    assert len(series) == 2 * len(Activity)  # one-hot over all four; none for an agent with no AI session
    plain_only = Snapshot(statuses={"plain": doc("plain")})
    assert "agentctl_agent_activity" not in Metrics(lambda: plain_only, lambda: 0).render().decode()
