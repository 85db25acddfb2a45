"""Status documents of CONTRACT §4: rendering from a fake clock, and writing only what changed, atomically."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from controller.model import ExitInfo, ExitReason, Handle, Phase
from controller.planner import PhaseView
from controller.status import Clock, StatusInput, StatusWriter, read_all, read_status, render
from tests.unit.builders import desired, exited, running, stopping

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z
AGENT = desired(replicas=2)
RUNNING = PhaseView(Phase.RUNNING, 2, 2, "Running")


def status_input(phase: PhaseView = RUNNING, **changes: Any) -> StatusInput:
    fields: dict[str, Any] = {
        "name": "reviewer", "source": "manifests/reviewer.yaml", "phase": phase, "spec_hash": AGENT.spec_hash,
        "instances": [running(i, started_at=T0 - 60) for i in AGENT.instances], "restarts": 0, "valid": True,
        "labels": {"team": "infra"}, "created_at": T0 - 3600,
    }
    fields.update(changes)
    return StatusInput(**fields)


def at(seconds: float) -> Clock:
    return Clock(wall=T0 + seconds, mono=500.0 + seconds)


def conditions(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in doc["conditions"]}


# -- rendering ------------------------------------------------------------------------------

def test_running_agent_renders_the_contract_fields() -> None:
    doc = render(status_input(), at(0), None)
    assert doc["name"] == "reviewer" and doc["phase"] == "Running" and doc["specHash"] == AGENT.spec_hash
    assert doc["replicas"] == {"desired": 2, "ready": 2}
    assert doc["lastError"] is None and doc["updatedAt"] == "2026-09-21T14:13:20Z"
    assert [(i["id"], i["pid"], i["startedAt"]) for i in doc["instances"]] == [
        ("reviewer-0", 1000, "2026-09-21T14:12:20Z"), ("reviewer-1", 1001, "2026-09-21T14:12:20Z")]
    assert conditions(doc)["Valid"] | {"lastTransitionTime": None} == {
        "type": "Valid", "status": "True", "reason": "Parsed", "message": "", "lastTransitionTime": None}
    assert (conditions(doc)["Ready"]["status"], conditions(doc)["Ready"]["reason"]) == ("True", "Running")


def test_instances_are_listed_by_index() -> None:
    recs = [running(AGENT.instances[1]), running(AGENT.instances[0])]
    assert [i["id"] for i in render(status_input(instances=recs), at(0), None)["instances"]] == [
        "reviewer-0", "reviewer-1"]


def test_conditions_keep_their_transition_time_while_their_status_is_unchanged() -> None:
    first = render(status_input(), at(0), None)
    later = render(status_input(phase=PhaseView(Phase.RUNNING, 2, 2, "Running")), at(30), first)
    assert conditions(later)["Ready"]["lastTransitionTime"] == conditions(first)["Ready"]["lastTransitionTime"]
    assert conditions(later)["Valid"]["lastTransitionTime"] == "2026-09-21T14:13:20Z"
    assert later["updatedAt"] == "2026-09-21T14:13:50Z"


def test_condition_that_flips_gets_a_new_transition_time() -> None:
    first = render(status_input(), at(0), None)
    backoff = render(status_input(phase=PhaseView(Phase.BACKOFF, 1, 2, "BackOff")), at(30), first)
    ready = conditions(backoff)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "BackOff")
    assert ready["lastTransitionTime"] == "2026-09-21T14:13:50Z"
    assert conditions(backoff)["Valid"]["lastTransitionTime"] == "2026-09-21T14:13:20Z"


def test_reason_change_with_the_same_status_keeps_the_transition_time() -> None:
    first = render(status_input(phase=PhaseView(Phase.STARTING, 0, 2, "Starting")), at(0), None)
    later = render(status_input(phase=PhaseView(Phase.BACKOFF, 0, 2, "BackOff")), at(10), first)
    assert conditions(later)["Ready"]["reason"] == "BackOff"
    assert conditions(later)["Ready"]["lastTransitionTime"] == conditions(first)["Ready"]["lastTransitionTime"]


def test_invalid_manifest_shows_valid_false_with_the_error_and_keeps_its_phase() -> None:
    err = "manifests/reviewer.yaml:7: spec.replicas: Input should be less than or equal to 100"
    doc = render(status_input(valid=False, errors=[err]), at(0), None)
    valid = conditions(doc)["Valid"]
    assert (valid["status"], valid["reason"], valid["message"]) == ("False", "InvalidManifest", err)
    assert doc["lastError"] == err
    assert doc["phase"] == "Running" and conditions(doc)["Ready"]["status"] == "True"


def test_failed_phase_carries_its_message_as_last_error() -> None:
    pv = PhaseView(Phase.FAILED, 0, 1, "CrashLoop", "more than 3 restarts within 60s")
    doc = render(status_input(phase=pv), at(0), None)
    assert doc["lastError"] == "more than 3 restarts within 60s"
    assert (conditions(doc)["Ready"]["status"], conditions(doc)["Ready"]["reason"]) == ("False", "CrashLoop")


def test_ready_is_false_while_any_replica_is_missing() -> None:
    doc = render(status_input(phase=PhaseView(Phase.STARTING, 1, 2, "Starting")), at(0), None)
    assert conditions(doc)["Ready"]["status"] == "False"


def test_exited_instance_shows_its_last_exit_and_next_attempt_but_no_pid() -> None:
    info = ExitInfo(1, None, T0 - 5, 12.3456, ExitReason.ERROR, ("boom",), "")
    rec = exited(AGENT.instances[0], next_start=510.0, last_exit=info)
    doc = render(status_input(instances=[rec]), at(0), None)
    (inst,) = doc["instances"]
    assert inst["pid"] is None and inst["startedAt"] is None
    assert inst["lastExit"] == {"exitCode": 1, "signal": None, "at": "2026-09-21T14:13:15Z",
                                "runtimeSeconds": 12.346, "reason": "Error", "logTail": ["boom"]}
    assert inst["nextAttemptAt"] == "2026-09-21T14:13:30Z"


def test_stopping_instance_says_why_it_is_stopping() -> None:
    doc = render(status_input(instances=[stopping(AGENT.instances[0], deadline=510.0)]), at(0), None)
    assert doc["instances"][0]["stopReason"] == "SpecChanged"


def test_git_source_adds_source_ready_and_the_revision() -> None:
    doc = render(status_input(source_revision="a" * 40, source_ready=(False, "fetch failed")), at(0), None)
    cond = conditions(doc)["SourceReady"]
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "FetchFailed", "fetch failed")
    assert doc["sourceRevision"] == "a" * 40
    assert "SourceReady" not in conditions(render(status_input(), at(0), None))


def test_written_status_is_plain_yaml_even_with_enum_reasons(tmp_path: Path) -> None:
    pv = PhaseView(Phase.STOPPING, 0, 0, ExitReason.MANIFEST_DELETED)
    info = ExitInfo(None, 15, T0, 1.0, ExitReason.MANIFEST_DELETED)
    doc = render(status_input(phase=pv, instances=[exited(AGENT.instances[0], last_exit=info)]), at(0), None)
    writer = StatusWriter(tmp_path)
    writer.write("reviewer", doc)
    writer.flush()
    text = (tmp_path / "reviewer.yaml").read_text()
    assert "!!" not in text and "reason: ManifestDeleted" in text
    assert read_status(tmp_path, "reviewer") == doc


# -- writing ------------------------------------------------------------------------------------

def test_status_dir_is_private_and_files_are_0600(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path / "state" / "status")
    assert stat.S_IMODE((tmp_path / "state" / "status").stat().st_mode) == 0o700
    assert writer.write("reviewer", render(status_input(), at(0), None))
    writer.flush()
    path = tmp_path / "state" / "status" / "reviewer.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_status(path.parent, "reviewer") == render(status_input(), at(0), None)


def test_identical_status_except_updated_at_is_not_rewritten(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path)
    first = render(status_input(), at(0), None)
    assert writer.write("reviewer", first)
    writer.flush()
    before = (tmp_path / "reviewer.yaml").stat()
    assert not writer.write("reviewer", render(status_input(), at(30), first))
    writer.flush()
    after = (tmp_path / "reviewer.yaml").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert read_status(tmp_path, "reviewer")["updatedAt"] == first["updatedAt"]  # type: ignore[index]


def test_changed_status_replaces_the_file_atomically_and_leaves_no_temporaries(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path)
    first = render(status_input(), at(0), None)
    writer.write("reviewer", first)
    writer.flush()
    before = (tmp_path / "reviewer.yaml").stat()
    second = render(status_input(restarts=1), at(30), first)
    assert writer.write("reviewer", second)
    writer.flush()
    after = (tmp_path / "reviewer.yaml").stat()
    assert after.st_ino != before.st_ino  # a new file renamed over the old: readers never see half a file
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert read_status(tmp_path, "reviewer") == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviewer.yaml"]


def test_writer_after_a_restart_does_not_rewrite_an_unchanged_status(tmp_path: Path) -> None:
    first = render(status_input(), at(0), None)
    earlier = StatusWriter(tmp_path)
    earlier.write("reviewer", first)
    earlier.flush()
    writer = StatusWriter(tmp_path)
    previous = writer.previous("reviewer")
    assert previous == first
    assert not writer.write("reviewer", render(status_input(), at(60), previous))


def test_removed_status_is_gone_from_disk_and_listing(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path)
    writer.write("reviewer", render(status_input(), at(0), None))
    writer.write("writer", render(status_input(name="writer"), at(0), None))
    writer.remove("reviewer")
    writer.remove("never-existed")
    writer.flush()
    assert writer.names_on_disk() == ["writer"]
    assert [d["name"] for d in read_all(tmp_path)] == ["writer"]


def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path / "status")
    (tmp_path / "status").rmdir()
    (tmp_path / "status").write_text("not a dir")
    assert writer.write("reviewer", render(status_input(), at(0), None))  # accepted: disk catches up later
    writer.flush()
    assert writer.failures == 1 and writer.last_error is not None and "reviewer" in writer.last_error


def test_unreadable_status_file_reads_as_missing(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("phase: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n")
    assert read_status(tmp_path, "broken") is None and read_status(tmp_path, "list") is None
    assert read_status(tmp_path, "missing") is None
    assert read_all(tmp_path) == []


def test_a_directory_source_that_cannot_be_read_says_so_with_its_reason() -> None:
    doc = render(status_input(source_ready=(False, "cannot read manifests: No such file or directory"),
                              source_reason="ReadFailed"), at(0), None)
    cond = conditions(doc)["SourceReady"]
    assert (cond["status"], cond["reason"]) == ("False", "ReadFailed") and "manifests" in cond["message"]


def test_a_status_that_cannot_be_written_is_reported_and_the_writer_goes_on(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path / "status")
    bad = {"name": "a", "unwritable": object()}  # YAML cannot represent it: the write fails
    writer.write("a", bad)
    writer.flush(timeout=5.0)
    assert writer.failures >= 1 and writer.last_error and "a" in writer.last_error
    writer.remove("a")  # the bad document is replaced: the writer still works
    writer.write("b", render(status_input(name="b"), at(0), None))
    writer.flush(timeout=5.0)
    assert read_status(tmp_path / "status", "b") is not None
    assert writer.last_error is None


def test_a_writer_thread_that_is_gone_is_started_again(tmp_path: Path) -> None:
    import threading

    writer = StatusWriter(tmp_path / "status")
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    writer._thread = dead  # as if it had died
    writer.write("c", render(status_input(name="c"), at(0), None))
    writer.flush(timeout=5.0)
    assert read_status(tmp_path / "status", "c") is not None


def test_a_file_name_that_is_not_utf8_is_written_escaped(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path / "status")
    writer.write("d", render(status_input(name="d", source="manifests/caf\udce9.yaml"), at(0), None))
    writer.flush(timeout=5.0)
    doc = read_status(tmp_path / "status", "d")
    assert doc is not None and doc["source"] == "manifests/caf\\udce9.yaml"


def test_each_instance_says_how_its_processes_are_tracked() -> None:
    first, second = AGENT.instances
    cg = running(first, handle=Handle(pid=7, pgid=7, start_ticks=1, cgroup="/sys/fs/cgroup/agentctl-c/x"))
    doc = render(status_input(instances=[cg, running(second)]), at(0), None)
    assert [i["tracking"] for i in doc["instances"]] == ["cgroup", "process-group"]
    gone = render(status_input(instances=[exited(first), exited(second)]), at(0), None)
    assert [i["tracking"] for i in gone["instances"]] == [None, None]
