"""The tmux adapter against a real tmux server on a private socket under /tmp."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from controller import procfs
from controller.model import Handle, InstanceSpec
from controller.supervisors import tmux
from controller.supervisors.base import Context, ExitStatus, SupervisorError
from tests.helpers import kill_group, reap, remove_cgroups, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

SLEEP = "import time; time.sleep(120)"


@dataclass
class Rig:
    root: Path
    ctx: Context
    adapter: tmux.TmuxSupervisor
    groups: list[int] = field(default_factory=list)
    servers: set[int] = field(default_factory=set)

    @property
    def log(self) -> Path:
        return self.root / "logs" / "a-0.log"

    def spec(self, code: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> InstanceSpec:
        return InstanceSpec(
            id="a-0",
            agent="a",
            index=0,
            supervisor="tmux",
            argv=(sys.executable, "-u", "-c", code, *args),
            env=tuple((env or {}).items()),
            cwd=str(cwd or self.root),
            spec_hash="sha256:test",
        )

    def start(self, code: str, *args: str, **kwargs: object) -> Handle:
        return self.start_spec(self.spec(code, *args, **kwargs))  # type: ignore[arg-type]

    def start_spec(self, spec: InstanceSpec) -> Handle:
        handle = self.adapter.start(spec, self.log)
        self.groups.append(handle.pgid)
        server = tmux.tmux_argv(self.ctx, ["display-message", "-p", "#{pid}"])
        shown = subprocess.run(server, capture_output=True, text=True, timeout=10, check=True)
        self.servers.add(int(shown.stdout))
        return handle

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def gone(self, handle: Handle) -> bool:
        return not self.adapter.alive(handle)


@pytest.fixture
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="ac", dir="/tmp"))  # tmp_path may be too long for a socket
    ctx = Context(state_dir=root / "state", controller_id=f"test-{os.urandom(3).hex()}")
    rig = Rig(root=root, ctx=ctx, adapter=tmux.TmuxSupervisor(ctx))
    try:
        yield rig
    finally:
        for pgid in rig.groups:
            kill_group(pgid)
        stop_servers(ctx, rig.servers)
        remove_cgroups(ctx.controller_id)
        shutil.rmtree(root, ignore_errors=True)


def stop_servers(ctx: Context, servers: set[int]) -> None:
    """kill-server, then reap each server we saw: they are orphaned to us (conftest: subreaper)."""
    subprocess.run(tmux.tmux_argv(ctx, ["kill-server"]), capture_output=True, timeout=10, check=False)
    for pid in servers:
        wait_for(lambda: not procfs.is_live(pid, procfs.start_ticks(pid) or 0), 10)  # noqa: B023
        reap(pid)



def assert_exit(rig: "Rig", adapter: tmux.TmuxSupervisor, handle: Handle, expected: ExitStatus) -> None:
    """exit_status reports what tmux recorded. tmux 3.3a, on a loaded host, now and then marks a
    pane dead without ever recording its status (no pane_dead_status, no pane_dead_time); the
    adapter must then say "unknown" (the controller records Lost), never guess."""
    got = adapter.exit_status(handle)
    if got == ExitStatus(None, None):
        pane = tmux.read_pane(rig.ctx, handle.unit)
        assert pane is not None and pane.dead and pane.status is None and pane.signal is None, (pane, expected)
        return
    assert got == expected

def test_tmux_is_available_here(rig: Rig) -> None:
    assert rig.adapter.unavailable_reason() is None


def test_socket_lives_in_the_state_dir(rig: Rig) -> None:
    rig.start(SLEEP)
    assert (rig.ctx.state_dir / "tmux.sock").is_socket()
    assert (rig.ctx.state_dir.stat().st_mode & 0o777) == 0o700


def test_output_printed_at_once_reaches_the_log(rig: Rig) -> None:
    handle = rig.start("import sys; print('first words'); sys.stderr.write('on stderr\\n')")
    wait_for(lambda: rig.gone(handle))
    assert_exit(rig, rig.adapter, handle, ExitStatus(0, None))
    rig.adapter.cleanup(handle)  # closes the pipe: `cat` writes what it still holds
    wait_for(lambda: "on stderr" in rig.log_text())
    assert "first words" in rig.log_text()
    assert (rig.log.stat().st_mode & 0o777) == 0o600


def test_log_is_appended_not_truncated(rig: Rig) -> None:
    rig.log.parent.mkdir(parents=True)
    rig.log.write_text("older run\n")
    handle = rig.start("print('newer run')")
    wait_for(lambda: "newer run" in rig.log_text())
    assert rig.log_text().startswith("older run\n")
    wait_for(lambda: rig.gone(handle))


def test_handle_names_the_command_process_itself(rig: Rig) -> None:
    handle = rig.start(SLEEP, "marker-arg")
    cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0] == sys.executable.encode() and b"marker-arg" in cmdline
    assert handle.pgid == handle.pid == os.getpgid(handle.pid)
    assert handle.start_ticks == procfs.start_ticks(handle.pid)
    assert handle.unit == "a-0"
    assert rig.adapter.alive(handle)


def test_single_word_command_runs_without_a_shell(rig: Rig) -> None:
    script = rig.root / "agent"
    script.write_text(f"#!{sys.executable}\nimport time\nprint('script up', flush=True)\ntime.sleep(120)\n")
    script.chmod(0o755)
    handle = rig.start_spec(replace(rig.spec(""), argv=(str(script),)))
    wait_for(lambda: "script up" in rig.log_text())
    cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:2] == [sys.executable.encode(), str(script).encode()]


def test_env_cwd_and_argv_are_applied_verbatim(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTCTL_TEST_INHERITED", "from controller")
    workdir = rig.root / "work #1"
    workdir.mkdir()
    code = (
        "import os, sys; e = os.environ;"
        "print('cwd=' + os.getcwd()); print('args=' + repr(sys.argv[1:]));"
        "print('env=' + repr([e.get(k) for k in ('FOO', 'AGENTCTL_TEST_INHERITED', 'TERM', 'BIG4')]))"
    )
    env = {"FOO": "bar; #{pane_id} $HOME", **{f"BIG{i}": "b" * 5000 for i in range(5)}}  # > tmux's 16 KiB
    handle = rig.start(code, "x;", "$HOME", "#{pane_id}", env=env, cwd=workdir)
    wait_for(lambda: "env=" in rig.log_text())
    text = rig.log_text()
    assert f"cwd={workdir}" in text
    assert "args=['x;', '$HOME', '#{pane_id}']" in text
    assert repr(["bar; #{pane_id} $HOME", "from controller", "tmux-256color", "b" * 5000]) in text.replace("\r\n", "")
    wait_for(lambda: rig.gone(handle))


def test_exit_code_is_reported(rig: Rig) -> None:
    handle = rig.start("import sys; sys.exit(3)")
    wait_for(lambda: rig.gone(handle))
    assert_exit(rig, rig.adapter, handle, ExitStatus(3, None))


def test_death_by_signal_is_reported_as_the_signal(rig: Rig) -> None:
    handle = rig.start(SLEEP)
    rig.adapter.signal(handle, signal.SIGTERM)
    wait_for(lambda: rig.gone(handle))
    assert_exit(rig, rig.adapter, handle, ExitStatus(None, signal.SIGTERM))


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
    assert_exit(rig, rig.adapter, handle, ExitStatus(None, signal.SIGKILL))


def test_grandchild_in_the_group_keeps_the_instance_alive_until_the_group_is_killed(rig: Rig) -> None:
    grandchild = "import os, signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); print('grandchild', os.getpid(), flush=True); time.sleep(120)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(120)"
    handle = rig.start(code)
    wait_for(lambda: "grandchild " in rig.log_text())  # printed once it ignores the SIGHUP of the pane's end
    child = int(rig.log_text().split("grandchild ")[1].split()[0])
    assert procfs.read_stat(child) is not None and procfs.read_stat(child).pgid == handle.pgid  # type: ignore[union-attr]
    os.kill(handle.pid, signal.SIGKILL)  # the main process alone
    wait_for(lambda: not procfs.is_live(handle.pid, handle.start_ticks))
    assert rig.adapter.alive(handle)  # the grandchild still runs in the group
    rig.adapter.signal(handle, signal.SIGKILL)
    wait_for(lambda: rig.gone(handle))
    wait_for(lambda: not procfs.is_live(child, procfs.start_ticks(child) or 0))
    reap(child)  # orphaned to us, the subreaper


def test_adopt_after_a_controller_restart(rig: Rig) -> None:
    handle = rig.start(SLEEP)
    fresh = tmux.TmuxSupervisor(rig.ctx)  # as a restarted controller builds it
    assert fresh.adopt(handle)
    assert not fresh.adopt(replace(handle, start_ticks=handle.start_ticks + 1))
    assert not fresh.adopt(replace(handle, pid=os.getpid()))
    assert not fresh.adopt(replace(handle, unit="no-such-session"))
    fresh.signal(handle, signal.SIGKILL)
    wait_for(lambda: rig.gone(handle))
    assert not fresh.adopt(handle)
    assert_exit(rig, fresh, handle, ExitStatus(None, signal.SIGKILL))  # tmux kept it (or never had it)


def test_capture_returns_the_screen(rig: Rig) -> None:
    handle = rig.start("print('hello screen'); print('\\x1b[31mred words\\x1b[0m'); import time; time.sleep(120)")
    wait_for(lambda: "red words" in tmux.capture(rig.ctx, handle, raw=False))
    plain = tmux.capture(rig.ctx, handle, raw=False)
    assert plain.startswith("hello screen\nred words")
    assert "\x1b" not in plain
    assert "\x1b[31m" in tmux.capture(rig.ctx, handle, raw=True)


def test_capture_of_a_missing_session_raises(rig: Rig) -> None:
    handle = Handle(pid=1, pgid=1, start_ticks=1, unit="nothing")
    with pytest.raises(SupervisorError):
        tmux.capture(rig.ctx, handle, raw=False)


def test_attach_argv_reaches_the_session(rig: Rig) -> None:
    handle = rig.start(SLEEP)
    argv = tmux.attach_argv(rig.ctx, handle)
    probe = [*argv[: argv.index("attach-session")], "has-session", "-t", argv[-1]]
    assert subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0


def test_cleanup_removes_the_session(rig: Rig) -> None:
    handle = rig.start("print('bye')")
    wait_for(lambda: rig.gone(handle))
    assert tmux.read_pane(rig.ctx, handle.unit) is not None  # remain-on-exit keeps the dead pane
    rig.adapter.cleanup(handle)
    assert tmux.read_pane(rig.ctx, handle.unit) is None


def test_starting_again_replaces_a_stale_session(rig: Rig) -> None:
    first = rig.start(SLEEP)
    second = rig.start(SLEEP)
    assert second.pid != first.pid
    wait_for(lambda: not procfs.is_live(first.pid, first.start_ticks))
    rig.adapter.cleanup(first)  # a late cleanup of the old handle leaves the new session alone
    assert rig.adapter.adopt(second)


def test_missing_executable_is_a_permanent_start_error(rig: Rig) -> None:
    spec = replace(rig.spec(""), argv=("no-such-agent-binary", "x"))
    with pytest.raises(SupervisorError) as err:
        rig.adapter.start(spec, rig.log)
    assert not err.value.retryable


def test_missing_cwd_is_a_permanent_start_error(rig: Rig) -> None:
    with pytest.raises(SupervisorError) as err:
        rig.adapter.start(rig.spec(SLEEP, cwd=rig.root / "absent"), rig.log)
    assert not err.value.retryable
