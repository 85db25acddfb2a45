"""The convergence defects of issue 11, reproduced with real processes.

The deterministic simulation (tests/sim) explores the interleavings; these prove the fixes
where they first happened: a controller killed between spawning an instance and recording it,
and a start that can never succeed.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.test_faults import by_instance, holds, inst, kill_tagged, running
from tests.helpers import Controller, pid_alive, reap, wait_for


@pytest.fixture
def tag() -> Iterator[str]:
    value = f"conv-{uuid.uuid4().hex[:12]}"
    yield value
    kill_tagged(value)


def test_an_instance_spawned_just_before_a_controller_crash_is_adopted_and_kept(ctl: Controller, tag: str) -> None:
    """SIGKILL between spawn and store write leaves a live, marked process the store does not know.
    The restarted controller must adopt it by its marker and keep it: before the fix it killed it a
    second later as an orphan of an earlier run, recorded it Lost and left the agent in BackOff."""
    cmd = ["sleep", "900101"]
    ctl.apply("keeper", cmd, env={"FAULT_TAG": tag})
    ctl.start()
    first = inst(running(ctl, "keeper"))
    spec_hash = ctl.status("keeper")["specHash"]  # type: ignore[index]
    cid = ctl.controller_id()
    assert cid
    ctl.kill()
    os.kill(first["pid"], 9)  # the recorded process is gone: its record names a dead run
    wait_for(lambda: (reap(first["pid"]), not pid_alive(first["pid"]))[1], 10, message="old run gone")
    # what the adapter had just spawned when the controller died: a group leader with the marker env
    env = {**os.environ, "FAULT_TAG": tag, "AGENTCTL_AGENT": "keeper", "AGENTCTL_INSTANCE": "keeper-0",
           "AGENTCTL_SPEC_HASH": spec_hash, "AGENTCTL_CONTROLLER_ID": cid, "AGENTCTL_RUN": "cafe0000beef",
           "AGENTCTL_LOG_FILE": str(ctl.state / "logs" / "keeper-0.log")}
    spawned = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    ctl.pgids.add(spawned.pid)
    try:
        _adopted_and_kept(ctl, tag, spawned)
    finally:
        spawned.kill()
        spawned.wait(10)


def _adopted_and_kept(ctl: Controller, tag: str, spawned: subprocess.Popen[bytes]) -> None:
    ctl.start()
    doc = ctl.wait_status("keeper", lambda d: d.get("phase") == "Running" and inst(d).get("pid") == spawned.pid,
                          message="the unrecorded process adopted")
    assert inst(doc)["restarts"] == 0
    # the orphan sweep runs a second after start-up: the adopted process must survive it
    holds(lambda: spawned.poll() is None and by_instance(tag) == {"keeper-0": [spawned.pid]}, 3.0,
          "the adopted process was killed or duplicated")
    assert ctl.status("keeper")["phase"] == "Running"  # type: ignore[index]


def test_a_start_that_can_never_succeed_is_failed_with_the_reason_and_not_retried(ctl: Controller) -> None:
    ctl.apply("ghost", ["/nonexistent/agent-binary", "--serve"])
    ctl.start()
    doc = ctl.wait_phase("ghost", "Failed")
    ready = next(c for c in doc["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert "/nonexistent/agent-binary" in ready["message"]
    exit_ = inst(doc)["lastExit"]
    assert exit_["exitCode"] == 127
    holds(lambda: (ctl.status("ghost") or {}).get("phase") == "Failed", 2.5, "a failed start was retried")
    assert "FailedStart" in ctl.cli("describe", "ghost").stdout
    # fixing the manifest (any edit) retries at once
    ctl.apply("ghost", ["sleep", "900102"])
    running(ctl, "ghost")
