"""The operator's view of status documents: REASON, durations, wait conditions, the running spec."""

from __future__ import annotations

from typing import Any

import pytest

from controller.opsview import exit_how, exit_word, parse_duration, parse_wait_for, reason, row


def doc(phase: str = "Running", *, valid: tuple[str, str] = ("True", "Parsed"),
        ready: tuple[str, str] = ("True", "Running"), **extra: Any) -> dict[str, Any]:
    return {"name": "a", "phase": phase, "replicas": {"desired": 1, "ready": 1}, "restarts": 0,
            "supervisor": "process", "conditions": [
                {"type": "Valid", "status": valid[0], "reason": valid[1], "message": ""},
                {"type": "Ready", "status": ready[0], "reason": ready[1], "message": ""}], **extra}


@pytest.mark.parametrize(("status", "expected"), [
    (doc(), ""),
    (doc(valid=("False", "InvalidManifest")), "InvalidManifest"),
    (doc(valid=("False", "DuplicateName")), "DuplicateName"),
    (doc("Failed", ready=("False", "CrashLoop")), "CrashLoop"),
    (doc("BackOff", ready=("False", "BackOff")), "BackOff"),
    (doc("Pending", ready=("False", "SupervisorUnavailable")), "SupervisorUnavailable"),
    (doc("Pending", ready=("False", "HostCapacity")), "HostCapacity"),
    (doc("Suspended", ready=("False", "SuspendedByOperator")), "SuspendedByOperator"),
    (doc("Suspended", ready=("False", "Suspended")), ""),  # spec.suspend: the manifest says so, PHASE shows it
    (doc(instances=[{"id": "a-0", "activity": "WaitingForInput"}]), "WaitingForInput"),
    (doc(instances=[{"id": "a-0", "activity": {"state": "waiting-for-input"}}]), "WaitingForInput"),
    (doc(instances=[{"id": "a-0", "activity": "Working"}]), ""),
])
def test_reason_is_empty_when_all_is_well_else_the_one_thing_to_know(status: dict[str, Any], expected: str) -> None:
    assert reason(status) == expected


def test_an_invalid_manifest_outranks_a_crash_loop_and_no_controller_outranks_all() -> None:
    broken = doc("Failed", valid=("False", "InvalidManifest"), ready=("False", "CrashLoop"))
    assert reason(broken) == "InvalidManifest"
    assert reason(broken, controller_up=False) == "ControllerDown"


def test_row_ends_with_reason_and_wide_adds_host_pids_last_exit_labels() -> None:
    status = doc("BackOff", ready=("False", "BackOff"), labels={"team": "infra"},
                 instances=[{"id": "a-0", "pid": None, "lastExit": {"exitCode": None, "signal": 9, "reason": "Signaled",
                                                                    "at": "2026-01-01T00:00:00Z"}}],
                 createdAt="2026-01-01T00:00:00Z")
    now = 1767225600.0 + 90  # 90 s after createdAt
    assert row(status, now) == ("a", "BackOff", "1/1", "0", "1m", "process", "BackOff")
    assert row(status, now, wide=True)[6:] == ("-", "-", "Signaled(SIGKILL)", "team=infra", "BackOff")


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("1h", 3600), ("1m30s", 90),
                                               ("500ms", 0.5), ("30", 30), ("1.5s", 1.5)])
def test_durations_like_kubectl(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "5 m", "-5s", "1h-2m"])
def test_bad_duration_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_wait_conditions() -> None:
    running = doc()
    assert parse_wait_for("phase=Running").met(running)
    assert not parse_wait_for("phase=Failed").met(running)
    assert parse_wait_for("condition=Ready").met(running)
    assert not parse_wait_for("condition=Ready=False").met(running)
    assert parse_wait_for("condition=Valid=true").met(running)
    assert not parse_wait_for("phase=Running").met(None)  # no status yet: not there yet
    assert parse_wait_for("delete").met(None)
    assert not parse_wait_for("delete").met(running)


@pytest.mark.parametrize("text", ["phase", "phase=", "condition=", "condition=Ready=maybe", "deleted", "ready"])
def test_bad_wait_condition_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_wait_for(text)


def test_one_exit_convention_in_words_and_in_logs() -> None:
    assert (exit_word(3, None), exit_how(3, None)) == ("Exited(3)", "exit code 3")
    assert (exit_word(None, 15), exit_how(None, 15)) == ("Signaled(SIGTERM)", "signal 15")
    assert (exit_word(None, None), exit_how(None, None)) == ("Exited(unknown)", "exit code unknown")


def test_running_spec_has_argv_after_presets_and_env_keys_never_values() -> None:
    from controller.opsview import spec_summary
    from tests.unit.builders import desired

    agent = desired("reviewer", provider="claude", model="opus", prompt="review the PR", env={"TOKEN": "s3cret"},
                    env_from_files={"API_KEY": "from-file"}, maxRestarts={"count": 5, "windowSeconds": 600})
    summary = spec_summary(agent)
    assert summary["argv"] == list(agent.instances[0].argv)
    assert "opus" in summary["argv"]  # the preset turned spec.model into argv
    assert {"TOKEN", "API_KEY", "AGENTCTL_MODEL"} <= set(summary["envKeys"])
    assert "s3cret" not in repr(summary) and "from-file" not in repr(summary)
    assert summary["maxRestarts"] == {"count": 5, "windowSeconds": 600}
    assert (summary["cwd"], summary["supervisor"], summary["restartPolicy"]) == ("/srv/base", "process", "Always")
