"""The first thing a user does: drop a manifest, see it run, delete it, see it gone."""

from __future__ import annotations

from tests.helpers import Controller, pid_alive, wait_for


def test_manifest_becomes_running_process_and_delete_stops_it(ctl: Controller) -> None:
    ctl.apply("hello")
    ctl.start()
    doc = ctl.wait_phase("hello", "Running")
    pid = doc["instances"][0]["pid"]
    assert pid_alive(pid)
    ctl.delete("hello.yaml")
    wait_for(lambda: ctl.status("hello") is None, message="status file removed")
    assert not pid_alive(pid)
