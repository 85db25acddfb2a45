"""The `process` adapter (controller/supervisors/process.py) against real child processes.

Each test starts tiny `sys.executable -c` programs through `ProcessSupervisor` on tmp_path;
a fixture kills every process group a test created, also when the test fails.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from controller import cgroups
from controller.model import Handle, InstanceSpec
from controller.supervisors.base import Context, ExitStatus, SupervisorError
from controller.supervisors.process import ProcessSupervisor
from tests.helpers import kill_group, pid_alive, reap, remove_cgroups, wait_for

SLEEP = "import time\nwhile True: time.sleep(1)"
DEADLINE = 20.0


def dead(pid: int) -> bool:
    """Gone for good: an orphan that came to us (the test process is a subreaper) is reaped first."""
    reap(pid)
    return not pid_alive(pid)


@dataclass
class Rig:
    root: Path
    adapter: ProcessSupervisor
    handles: list[Handle] = field(default_factory=list)
    strays: list[int] = field(default_factory=list)  # grandchildren that come to us when orphaned

    @property
    def log(self) -> Path:
        return self.root / "logs" / "a-0.log"

    def spec(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> InstanceSpec:
        return InstanceSpec(id="a-0", agent="a", index=0, supervisor="process", argv=tuple(argv),
                            env=tuple((env or {}).items()), cwd=str(cwd or self.root), spec_hash="sha256:test")

    def start(self, code: str, *args: str, **kwargs: object) -> Handle:
        handle = self.adapter.start(self.spec([sys.executable, "-u", "-c", code, *args], **kwargs), self.log)  # type: ignore[arg-type]
        self.handles.append(handle)
        return handle

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_output(self, needle: str) -> str:
        def found() -> str | None:
            text = self.output()
            return text if needle in text else None
        text = wait_for(found, DEADLINE, message=f"{needle!r} in the log")
        assert text is not None
        return text

    def wait_gone(self, handle: Handle) -> None:
        wait_for(lambda: not self.adapter.alive(handle), DEADLINE, message=f"instance pid {handle.pid} gone")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    cid = f"test-process-{os.urandom(3).hex()}"  # its own cgroup subtree, whatever runs beside it
    made = Rig(tmp_path, ProcessSupervisor(Context(tmp_path, cid)))
    yield made
    for handle in made.handles:
        kill_group(handle.pgid)
        made.adapter.signal(handle, signal.SIGKILL)  # the cgroup too, when it has one
        # let the adapter's own Popen reap its child (no zombie, no ResourceWarning)
        wait_for(lambda: not made.adapter.alive(handle), DEADLINE, message=f"group {handle.pgid} killed")  # noqa: B023
        made.adapter.exit_status(handle)
    for pid in made.strays:
        reap(pid)
    remove_cgroups(cid)


def test_start_appends_stdout_and_stderr_to_the_log(rig: Rig) -> None:
    rig.log.parent.mkdir(parents=True)
    rig.log.write_text("earlier line\n")
    handle = rig.start("import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)")
    rig.wait_gone(handle)
    text = rig.output()
    assert text.startswith("earlier line\n"), "the log is appended to, never truncated"
    assert "to stdout" in text and "to stderr" in text
    assert rig.adapter.exit_status(handle) == ExitStatus(0, None)


def test_log_file_is_private(rig: Rig) -> None:
    handle = rig.start("print('hi')")
    rig.wait_gone(handle)
    assert os.stat(rig.log).st_mode & 0o077 == 0


def test_argv_is_not_run_through_a_shell(rig: Rig, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    tricky = f"$(touch {target}); touch {target} `touch {target}` | true"
    handle = rig.start("import sys\nprint(repr(sys.argv[1:]))", tricky, "*")
    rig.wait_gone(handle)
    assert repr([tricky, "*"]) in rig.output()
    assert not target.exists()


def test_cwd_and_env_are_applied(rig: Rig, tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    handle = rig.start("import os\nprint('cwd=' + os.getcwd())\nprint('FOO=' + os.environ['FOO'])",
                       env={"FOO": "bar baz"}, cwd=work)
    rig.wait_gone(handle)
    text = rig.output()
    assert f"cwd={work}" in text
    assert "FOO=bar baz" in text
    assert rig.adapter.exit_status(handle) == ExitStatus(0, None)


def test_instance_is_its_own_process_group_leader(rig: Rig) -> None:
    handle = rig.start(SLEEP)
    assert handle.pgid == handle.pid
    assert os.getpgid(handle.pid) == handle.pid
    assert os.getsid(handle.pid) == handle.pid, "a new session: no terminal signals from ours"
    assert handle.start_ticks > 0
    assert rig.adapter.alive(handle)


def test_exit_status_of_an_exit_code(rig: Rig) -> None:
    handle = rig.start("raise SystemExit(7)")
    rig.wait_gone(handle)
    assert rig.adapter.exit_status(handle) == ExitStatus(7, None)


def test_exit_status_of_a_signal(rig: Rig) -> None:
    handle = rig.start("import os, signal\nprint('up', flush=True)\nos.kill(os.getpid(), signal.SIGUSR1)\n" + SLEEP)
    rig.wait_gone(handle)
    status = rig.adapter.exit_status(handle)
    assert status == ExitStatus(None, signal.SIGUSR1)
    assert status.known


def test_signal_reaches_the_whole_group(rig: Rig) -> None:
    handle = rig.start(SLEEP)
    rig.adapter.signal(handle, signal.SIGTERM)
    rig.wait_gone(handle)
    assert rig.adapter.exit_status(handle) == ExitStatus(None, signal.SIGTERM)


def test_alive_is_false_once_a_finished_group_is_reaped(rig: Rig) -> None:
    handle = rig.start("print('done')")
    rig.wait_gone(handle)
    # alive() reaps its own child: no zombie is left behind
    assert not os.path.exists(f"/proc/{handle.pid}") or not pid_alive(handle.pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(handle.pid, os.WNOHANG)  # not ours to reap: the adapter's Popen already did
    assert not rig.adapter.alive(handle)


GRANDPARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
print("grandchild", child.pid, flush=True)
"""


def test_alive_while_a_grandchild_in_the_group_lives(rig: Rig) -> None:
    handle = rig.start(GRANDPARENT)
    text = rig.wait_output("grandchild ")
    grandchild = int(text.split("grandchild ", 1)[1].split()[0])
    rig.strays.append(grandchild)
    wait_for(lambda: not pid_alive(handle.pid), DEADLINE, message="the leader exits")
    assert pid_alive(grandchild) and os.getpgid(grandchild) == handle.pgid
    assert rig.adapter.alive(handle), "a live process of the group keeps the instance alive"
    assert rig.adapter.exit_status(handle) == ExitStatus(0, None)
    rig.adapter.signal(handle, signal.SIGKILL)
    wait_for(lambda: dead(grandchild), DEADLINE, message="grandchild killed")
    assert not rig.adapter.alive(handle)


def test_adopt_refuses_a_handle_with_other_start_ticks(rig: Rig) -> None:
    handle = rig.start(SLEEP)
    assert rig.adapter.adopt(handle)
    # a fresh adapter, as after a controller restart: it knows the process only by its handle
    other = ProcessSupervisor(Context(rig.root, rig.adapter.ctx.controller_id))
    assert other.adopt(handle)
    reused = replace(handle, start_ticks=handle.start_ticks + 1)
    assert not other.adopt(reused), "same pid, other start time: another process (pid reuse)"
    assert other.exit_status(handle) == ExitStatus(None, None), "an adopted process's exit code is unknown"


def test_adopt_refuses_a_dead_process(rig: Rig) -> None:
    handle = rig.start("pass")
    rig.wait_gone(handle)
    assert not rig.adapter.adopt(handle)


def test_nonexistent_executable_raises_supervisor_error(rig: Rig, tmp_path: Path) -> None:
    spec = rig.spec([str(tmp_path / "no-such-program"), "--flag"])
    with pytest.raises(SupervisorError) as info:
        rig.adapter.start(spec, rig.log)
    assert "no-such-program" in str(info.value)
    assert info.value.retryable is False


def test_missing_cwd_raises_supervisor_error(rig: Rig, tmp_path: Path) -> None:
    spec = rig.spec([sys.executable, "-c", "pass"], cwd=tmp_path / "missing")
    with pytest.raises(SupervisorError):
        rig.adapter.start(spec, rig.log)


# -- per-instance cgroups (CONTRACT §11) ---------------------------------------------------
def cgroup_problem() -> str | None:
    probe = cgroups.Cgroups(f"probe-{os.getpid()}")
    problem = probe.unavailable_reason()
    base = cgroups.base_dir(probe.controller_id)
    if base is not None:
        cgroups.remove(base)
    return problem


needs_cgroups = pytest.mark.skipif(cgroup_problem() is not None, reason=f"no per-instance cgroups: {cgroup_problem()}")
ESCAPER = (
    "import os, subprocess, sys, time\n"
    "helper = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(300)'])\n"
    "print('helper', helper.pid, flush=True)\n"
    "while True: time.sleep(1)\n"
)


@needs_cgroups
def test_the_child_is_in_its_own_cgroup_from_its_first_instruction(rig: Rig) -> None:
    handle = rig.start("import os; print('cg', open('/proc/self/cgroup').read().strip(), flush=True)\n" + SLEEP)
    assert handle.cgroup and cgroups.contains(handle.cgroup, handle.pid)
    text = rig.wait_output("cg ")
    assert os.path.basename(handle.cgroup) in text  # already there when the command's code ran


@needs_cgroups
def test_a_setsid_helper_keeps_the_instance_alive_and_sigkill_takes_it(rig: Rig) -> None:
    handle = rig.start(ESCAPER)
    helper = int(rig.wait_output("helper ").split("helper ")[1].split()[0])
    rig.strays.append(helper)
    wait_for(lambda: os.getpgid(helper) == helper, DEADLINE, message="helper in its own session")
    os.kill(handle.pid, signal.SIGKILL)  # the leader alone: only the cgroup still knows the helper
    wait_for(lambda: not pid_alive(handle.pid), DEADLINE)
    assert rig.adapter.alive(handle), "a process of the instance still lives"
    rig.adapter.signal(handle, signal.SIGKILL)
    wait_for(lambda: dead(helper), DEADLINE, message="helper killed through the cgroup")
    rig.wait_gone(handle)
    rig.adapter.exit_status(handle)
    rig.adapter.cleanup(handle)
    assert not os.path.exists(handle.cgroup), "the empty cgroup is removed"


@needs_cgroups
def test_memory_of_a_cgroup_instance_counts_its_escaped_helper(rig: Rig) -> None:
    from controller import procfs
    from controller.health import instance_memory

    grower = "import os, time; os.setsid(); held = b'x' * (40 << 20); print('held', flush=True); time.sleep(300)"
    handle = rig.start(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {grower!r}])\n" + SLEEP)
    rig.wait_output("held")
    usage = instance_memory(procfs.snapshot(), handle)
    assert usage > 40 << 20, usage


def test_with_cgroups_off_the_instance_is_tracked_by_its_group(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cgroups.SWITCH, "off")
    adapter = ProcessSupervisor(Context(rig.root, f"test-off-{os.urandom(3).hex()}"))
    handle = adapter.start(rig.spec([sys.executable, "-c", SLEEP]), rig.log)
    try:
        assert handle.cgroup == ""
        assert adapter.alive(handle)
    finally:
        adapter.signal(handle, signal.SIGKILL)
        wait_for(lambda: not adapter.alive(handle), DEADLINE, message="killed by its group")
        assert adapter.exit_status(handle) == ExitStatus(None, signal.SIGKILL)


@needs_cgroups
def test_an_executable_without_shebang_is_not_run_by_a_shell(rig: Rig, tmp_path: Path) -> None:
    script = tmp_path / "no-shebang"
    script.write_text("echo ran-by-a-shell\n")
    script.chmod(0o755)
    with pytest.raises(SupervisorError, match="Exec format error"):
        rig.adapter.start(rig.spec([str(script)]), rig.log)
    assert "ran-by-a-shell" not in rig.output()


@needs_cgroups
def test_freeze_and_kill_ends_a_forking_instance_without_cgroup_kill(rig: Rig) -> None:
    """The path for kernels without cgroup.kill, run here on purpose."""
    forker = "import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(300)\n    time.sleep(0.05)\n"
    handle = rig.start(forker)
    wait_for(lambda: len(cgroups.procs(handle.cgroup)) >= 3, DEADLINE, message="a few children forked")
    members = cgroups.procs(handle.cgroup)
    rig.strays.extend(members)
    cgroups.freeze_and_kill(Path(handle.cgroup))
    wait_for(lambda: not cgroups.live_pids(handle.cgroup), DEADLINE, message="every member killed")
    for pid in members:
        reap(pid)
    assert (Path(handle.cgroup) / "cgroup.freeze").read_text().strip() == "0", "thawed again"


# -- how the child is made: born in its cgroup (clone3), or joined through the trampoline --------
STATUS = "print([l for l in open('/proc/self/status') if l.startswith(('SigBlk', 'SigIgn'))], flush=True)\n"


@needs_cgroups
def test_the_child_starts_with_no_signal_blocked_and_only_its_stdio_open(rig: Rig) -> None:
    # python itself ignores SIGPIPE and SIGXFSZ at start: read the mask of a plain program instead
    handle = rig.adapter.start(rig.spec(["/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]), rig.log)
    rig.handles.append(handle)
    text = rig.wait_output("SigIgn")
    assert "SigBlk:\t0000000000000000" in text and "SigIgn:\t0000000000000000" in text, text
    handle = rig.start("import os; print('fds', sorted(os.listdir('/proc/self/fd')), flush=True)\n" + SLEEP)
    listed = rig.wait_output("fds ").split("fds ")[1].splitlines()[0]
    assert listed == "['0', '1', '2', '3']", listed  # stdio and the listing's own fd: nothing of ours leaked
    assert os.getsid(handle.pid) == handle.pid


@needs_cgroups
def test_children_are_born_in_their_cgroup_while_other_threads_keep_the_interpreter_busy(rig: Rig) -> None:
    import threading

    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(2000))  # pure Python: holds the GIL until asked for it

    rig.adapter.burst_gap = 0.0  # every start is born in its cgroup, however close together
    threads = [threading.Thread(target=busy) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(10):
            handle = rig.start(SLEEP)
            assert cgroups.contains(handle.cgroup, handle.pid)
            rig.adapter.signal(handle, signal.SIGKILL)
            rig.wait_gone(handle)
            rig.adapter.exit_status(handle)
            rig.adapter.cleanup(handle)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert rig.adapter.clone.usable(), rig.adapter.clone.problem


@needs_cgroups
def test_without_clone3_the_child_joins_its_cgroup_through_the_trampoline(rig: Rig) -> None:
    rig.adapter.clone.problem = "off for this test"
    handle = rig.start("import os; print('cg', open('/proc/self/cgroup').read().strip(), flush=True)\n" + SLEEP)
    assert os.path.basename(handle.cgroup) in rig.wait_output("cg ")  # there before the command ran
    assert cgroups.contains(handle.cgroup, handle.pid)
    rig.adapter.signal(handle, signal.SIGKILL)
    rig.wait_gone(handle)
    assert rig.adapter.exit_status(handle) == ExitStatus(None, signal.SIGKILL)


def test_a_nul_byte_in_the_env_is_a_final_start_error(rig: Rig) -> None:
    with pytest.raises(SupervisorError) as info:
        rig.adapter.start(rig.spec([sys.executable, "-c", "pass"], env={"A": "x\0y"}), rig.log)
    assert info.value.retryable is False


@needs_cgroups
def test_a_signal_the_controller_ignores_stays_ignored_in_the_child_as_with_popen(rig: Rig) -> None:
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        handle = rig.adapter.start(rig.spec(["/bin/grep", "^SigIgn", "/proc/self/status"]), rig.log)
        rig.handles.append(handle)
    finally:
        signal.signal(signal.SIGHUP, before)
    text = rig.wait_output("SigIgn")
    assert "SigIgn:\t0000000000000001" in text, text  # SIGHUP only: SIGPIPE and SIGXFSZ are restored


@needs_cgroups
def test_a_start_works_when_the_controller_holds_more_than_1024_fds(rig: Rig) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"fd limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(1100)]  # as with 1000 agents
    try:
        handle = rig.start(SLEEP)
        assert cgroups.contains(handle.cgroup, handle.pid)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
