"""The fence process on its own (controller.fleet.fence): real processes, no etcd.

A stand-in 'controller' (a sleeping child we control) and instances in their own process
groups; the fence must kill the groups once the deadline in fence.json passes, never before,
hand over to a successor, and exit once its controller is gone and it has fenced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import kill_group, pid_alive, reap, sleeper, wait_for


def _ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[19])


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for p in made:
        kill_group(p.pid)
        try:
            p.kill()
        except ProcessLookupError:
            pass
        p.wait(10)


def _spawn(procs: list[subprocess.Popen[bytes]], argv: list[str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p)
    return p


def _write(path: Path, controller: int, deadline: float, targets: list[subprocess.Popen[bytes]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"controller": controller, "controllerId": "", "deadline": deadline,
                               "targets": [[t.pid, t.pid, _ticks(t.pid)] for t in targets]}))
    os.replace(tmp, path)


def _fence(procs: list[subprocess.Popen[bytes]], path: Path, controller: int) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-m", "controller.fleet.fence", "--file", str(path),
                          "--controller-pid", str(controller), "--controller-start", str(_ticks(controller))],
                         stderr=subprocess.DEVNULL)
    procs.append(p)
    return p


def test_the_fence_kills_the_instances_when_the_deadline_passes(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    controller = _spawn(procs, sleeper())
    agent = _spawn(procs, sleeper())
    path = tmp_path / "fence.json"
    _write(path, controller.pid, time.monotonic() + 3600, [agent])
    fence = _fence(procs, path, controller.pid)
    wait_for(lambda: fence.poll() is None and pid_alive(agent.pid), 5, message="fence running")
    assert pid_alive(agent.pid)  # deadline far away: nothing happens
    os.kill(controller.pid, signal.SIGSTOP)  # the controller hangs; only the fence can act
    _write(path, controller.pid, time.monotonic() + 0.3, [agent])
    wait_for(lambda: agent.poll() is not None, 10, message="the fence kills the instance's group")
    assert agent.returncode == -signal.SIGKILL
    assert fence.poll() is None  # its controller still exists (hung): the fence stays
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait(10)
    assert fence.wait(10) == 0  # controller gone and fenced: it leaves


def test_the_fence_outlives_a_dead_controller_until_the_deadline(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    controller = _spawn(procs, sleeper())
    agent = _spawn(procs, sleeper())
    path = tmp_path / "fence.json"
    _write(path, controller.pid, time.monotonic() + 1.0, [agent])
    fence = _fence(procs, path, controller.pid)
    controller.kill()
    controller.wait(10)
    assert fence.wait(30) == 0
    assert agent.wait(5) == -signal.SIGKILL


def test_the_fence_hands_over_to_a_successor_controller(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    old = _spawn(procs, sleeper())
    agent = _spawn(procs, sleeper())
    path = tmp_path / "fence.json"
    _write(path, old.pid, time.monotonic() + 3600, [agent])
    fence = _fence(procs, path, old.pid)
    old.kill()
    old.wait(10)
    new = _spawn(procs, sleeper())
    _write(path, new.pid, time.monotonic() + 3600, [agent])  # the restarted controller took over the file
    assert fence.wait(30) == 0
    assert pid_alive(agent.pid)  # adopted, not killed
    reap(agent.pid)
