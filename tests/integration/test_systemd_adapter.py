"""The systemd adapter against the real user manager, where one answers (skipped elsewhere)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from controller import procfs
from controller.model import Handle, InstanceSpec
from controller.supervisors import systemd
from controller.supervisors.base import Context, ExitStatus, SupervisorError
from tests.helpers import kill_group, wait_for

SLEEP = "import time; time.sleep(120)"


def user_manager_problem() -> str | None:
    """None when `systemctl --user show-environment` works, else what it said."""
    try:
        proc = subprocess.run(
            ["systemctl", "--user", "show-environment"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit code {proc.returncode}")


@dataclass
class Rig:
    root: Path
    ctx: Context
    adapter: systemd.SystemdSupervisor
    handles: list[Handle] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.root / "logs" / "a-0.log"

    def spec(self, code: str, *args: str, env: dict[str, str] | None = None) -> InstanceSpec:
        return InstanceSpec(
            id="a-0",
            agent="a",
            index=0,
            supervisor="systemd",
            argv=(sys.executable, "-u", "-c", code, *args),
            env=tuple((env or {}).items()),
            cwd=str(self.root),
            spec_hash="sha256:test",
        )

    def start(self, code: str, *args: str, env: dict[str, str] | None = None) -> Handle:
        handle = self.adapter.start(self.spec(code, *args, env=env), self.log)
        self.handles.append(handle)
        return handle

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def gone(self, handle: Handle) -> bool:
        return not self.adapter.alive(handle)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    problem = user_manager_problem()
    if problem is not None:
        pytest.skip(f"no systemd user manager: systemctl --user show-environment failed: {problem}")
    ctx = Context(state_dir=tmp_path / "state", controller_id="t" + uuid.uuid4().hex[:8])
    rig = Rig(root=tmp_path, ctx=ctx, adapter=systemd.SystemdSupervisor(ctx))
    try:
        yield rig
    finally:
        for handle in rig.handles:
            kill_group(handle.pgid)
            subprocess.run(systemd.kill_argv(handle.unit, signal.SIGKILL), capture_output=True, timeout=30, check=False)
            subprocess.run(systemd.stop_argv(handle.unit), capture_output=True, timeout=30, check=False)
            subprocess.run(systemd.reset_failed_argv(handle.unit), capture_output=True, timeout=30, check=False)


def test_unavailable_reason_names_the_failing_command_when_no_user_manager_answers() -> None:
    problem = user_manager_problem()
    if problem is None:
        pytest.skip("a systemd user manager answers here")
    reason = systemd.SystemdSupervisor(Context(Path("/tmp/unused"), "c1")).unavailable_reason()
    assert reason
    assert "\n" not in reason
    assert "systemctl --user show-environment" in reason or "not found" in reason


def test_available_with_a_user_manager(rig: Rig) -> None:
    assert rig.adapter.unavailable_reason() is None


def test_output_env_and_cwd(rig: Rig) -> None:
    code = "import os, sys; print('first words', os.getcwd(), os.environ['FOO'], sys.argv[1:]); sys.stderr.write('err\\n')"
    handle = rig.start(code, "$HOME", env={"FOO": "bar baz"})
    wait_for(lambda: "err" in rig.log_text())
    text = rig.log_text()
    assert f"first words {rig.root} bar baz ['$HOME']" in text
    wait_for(lambda: rig.gone(handle))
    assert rig.adapter.exit_status(handle) == ExitStatus(0, None)


def test_handle_names_the_command_process_itself(rig: Rig) -> None:
    handle = rig.start(SLEEP, "marker-arg")
    cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
    assert b"marker-arg" in cmdline
    assert handle.pgid == handle.pid == os.getpgid(handle.pid)
    assert handle.start_ticks == procfs.start_ticks(handle.pid)
    assert handle.unit == systemd.unit_name(rig.ctx.controller_id, "a-0")


def test_exit_code_is_reported(rig: Rig) -> None:
    handle = rig.start("import sys; sys.exit(3)")
    wait_for(lambda: rig.gone(handle))
    assert rig.adapter.exit_status(handle) == ExitStatus(3, None)


def test_death_by_signal_is_reported_as_the_signal(rig: Rig) -> None:
    handle = rig.start(SLEEP)
    rig.adapter.signal(handle, signal.SIGTERM)
    wait_for(lambda: rig.gone(handle))
    assert rig.adapter.exit_status(handle) == ExitStatus(None, signal.SIGTERM)


def test_sigkill_ends_a_process_that_ignores_sigterm(rig: Rig) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('ignored TERM', flush=True))\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    handle = rig.start(code)
    wait_for(lambda: "ready" in rig.log_text())
    rig.adapter.signal(handle, signal.SIGTERM)
    wait_for(lambda: "ignored TERM" in rig.log_text())
    assert rig.adapter.alive(handle)
    rig.adapter.signal(handle, signal.SIGKILL)
    wait_for(lambda: rig.gone(handle))


def test_adopt_after_a_controller_restart(rig: Rig) -> None:
    handle = rig.start(SLEEP)
    fresh = systemd.SystemdSupervisor(rig.ctx)
    assert fresh.adopt(handle)
    assert not fresh.adopt(replace(handle, start_ticks=handle.start_ticks + 1))
    assert not fresh.adopt(replace(handle, unit="agentctl-no-such-unit.service"))


def test_cleanup_unloads_the_unit(rig: Rig) -> None:
    handle = rig.start("import sys; sys.exit(1)")
    wait_for(lambda: rig.gone(handle))
    rig.adapter.cleanup(handle)
    state = systemd.read_unit(handle.unit)
    assert state is None or not state.loaded


def test_missing_executable_is_a_permanent_start_error(tmp_path: Path) -> None:
    """Checked before any systemd call: runs everywhere."""
    adapter = systemd.SystemdSupervisor(Context(tmp_path / "state", "c1"))
    spec = InstanceSpec("a-0", "a", 0, "systemd", ("no-such-agent-binary",), (), str(tmp_path), "h")
    with pytest.raises(SupervisorError) as err:
        adapter.start(spec, tmp_path / "a.log")
    assert not err.value.retryable
