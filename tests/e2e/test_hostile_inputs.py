"""Hostile environments for everything that reads input (CONTRACT §11): reads that fail, files
that are not files, names that are not UTF-8, a manifests dir swapped under the watch, Git
revisions too big to export, and logs written faster than rotation used to look at them.

Every failure here is real: a full descriptor table (prlimit on the controller), a directory
the controller may not read (run without CAP_DAC_OVERRIDE), a FIFO, a dangling symlink, a real
repository. Agents carry FAULT_TAG so they are found and killed by pid; nothing is killed by name.
"""

from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.gitsource import GitSource
from controller.loader import ManifestSource
from controller.providers import BUILTIN
from controller.store import AgentRow, Store
from tests.e2e.test_faults import DEADLINE, holds, kill_tagged, metric_values, running
from tests.helpers import PY, Controller, manifest, pid_alive, wait_for

SETPRIV = shutil.which("setpriv")
GIT = shutil.which("git")


@pytest.fixture
def tag() -> Iterator[str]:
    value = f"inputs-{uuid.uuid4().hex[:12]}"
    yield value
    kill_tagged(value)


@pytest.fixture
def hctl(tag: str, controller_factory: Callable[..., Controller]) -> Controller:
    return controller_factory()


def agent(ctl: Controller, tag: str, name: str, rel: str | None = None, **spec: Any) -> Path:
    spec.setdefault("env", {})["FAULT_TAG"] = tag
    return ctl.write(rel or f"{name}.yaml", manifest(name, ["sleep", f"{900000 + len(name)}"], **spec))


def cond(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in doc.get("conditions", []) if c["type"] == kind), {})


def source_ready(ctl: Controller, name: str, status: str, timeout: float = DEADLINE) -> dict[str, Any]:
    return ctl.wait_status(name, lambda d: cond(d, "SourceReady").get("status") == status, timeout,
                           f"{name} SourceReady={status}")


def reported_or_stopped(ctl: Controller, name: str, before: dict[str, list[int]],
                        timeout: float = DEADLINE) -> dict[str, Any]:
    """Wait until the read failure shows on name's status (SourceReady=False), failing at once,
    with the real defect, if any process of before died meanwhile."""
    def check() -> dict[str, Any] | None:
        dead = [p for ps in before.values() for p in ps if not pid_alive(p)]
        assert not dead, f"agents were stopped by a read that failed: {dead}\n{ctl.log()[-3000:]}"
        doc = ctl.status(name)
        return doc if doc and cond(doc, "SourceReady").get("status") == "False" else None
    found = wait_for(check, timeout, message=f"{name} SourceReady=False")
    assert found is not None
    return found


def pids_of(ctl: Controller, *names: str) -> dict[str, list[int]]:
    return {n: ctl.pids(n) for n in names}


def assert_undisturbed(ctl: Controller, before: dict[str, list[int]]) -> None:
    """Same processes, alive, no restart, no deletion: nothing was taken as removed."""
    for name, pids in before.items():
        doc = running(ctl, name)
        assert ctl.pids(name) == pids, (name, doc)
        assert all(pid_alive(p) for p in pids), name
        assert doc["restarts"] == 0, doc
    assert "manifest removed" not in ctl.log(), ctl.log()[-3000:]


# -- 1. a read that fails is never a deletion ---------------------------------------------------------

def lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(i for i in range(len(used) + 1) if i not in used)


def test_a_full_descriptor_table_stops_nothing_and_is_reported(hctl: Controller, tag: str) -> None:
    for name in ("a", "b"):
        agent(hctl, tag, name)
    hctl.start()
    before = pids_of(hctl, *(running(hctl, n)["name"] for n in ("a", "b")))
    assert hctl.proc is not None
    pid = hctl.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # every descriptor number below the limit is taken: the next open (the walk's) fails with EMFILE
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid), hard))
    try:
        agent(hctl, tag, "c")  # a file event: the controller walks the manifests dir and cannot

        def logged() -> bool:  # status files cannot be written either (no descriptor): the log says it
            dead = [p for ps in before.values() for p in ps if not pid_alive(p)]
            assert not dead, f"agents were stopped by a walk that failed: {dead}\n{hctl.log()[-3000:]}"
            return "cannot read the manifest source" in hctl.log()
        wait_for(logged, DEADLINE, message="the read failure logged")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    for name in ("a", "b"):
        source_ready(hctl, name, "True")
    running(hctl, "c")
    assert_undisturbed(hctl, before)
    assert "Deleted" not in hctl.cli("describe", "a").stdout


def test_a_renamed_away_manifests_dir_is_a_read_failure_not_a_deletion(hctl: Controller, tag: str) -> None:
    agent(hctl, tag, "a")
    agent(hctl, tag, "b", "team/b.yaml")
    hctl.start()
    before = pids_of(hctl, *(running(hctl, n)["name"] for n in ("a", "b")))
    new = hctl.root / "manifests.new"
    shutil.copytree(hctl.manifests, new)
    hctl.manifests.rename(hctl.root / "manifests.old")
    doc = reported_or_stopped(hctl, "a", before)
    assert cond(doc, "SourceReady")["reason"] == "ReadFailed" and "manifests" in cond(doc, "SourceReady")["message"]
    assert running(hctl, "b")["phase"] == "Running"
    new.rename(hctl.manifests)
    source_ready(hctl, "a", "True")
    assert_undisturbed(hctl, before)


def test_rename_based_redeploys_in_a_row_restart_nothing(hctl: Controller, tag: str) -> None:
    """`mv manifests manifests.old && mv manifests.new manifests`: absent for a moment, ten times."""
    agent(hctl, tag, "a")
    hctl.start()
    before = pids_of(hctl, running(hctl, "a")["name"])
    for i in range(10):
        staged = hctl.root / "manifests.new"
        shutil.copytree(hctl.manifests, staged)
        old = hctl.root / f"manifests.old{i}"
        hctl.manifests.rename(old)
        time.sleep(0.05)  # the window a rename-based redeploy leaves, on purpose (not a wait for a condition)
        staged.rename(hctl.manifests)
        shutil.rmtree(old)
    agent(hctl, tag, "z")  # and the watch still follows the directory now under that name
    running(hctl, "z")
    assert_undisturbed(hctl, before)
    source_ready(hctl, "a", "True")


class UnprivilegedController(Controller):
    """The controller as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: mode 000 really denies it."""

    def args(self, *extra: str) -> list[str]:
        assert SETPRIV is not None
        return [SETPRIV, "--bounding-set=-dac_override,-dac_read_search", *super().args(*extra)]


@pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
def test_an_unreadable_subdirectory_keeps_its_agents_and_the_rest_applies(tmp_path: Path, tag: str) -> None:
    ctl = UnprivilegedController(tmp_path / "c")
    sub = ctl.manifests / "team"
    try:
        agent(ctl, tag, "a", "team/a.yaml")
        agent(ctl, tag, "b")
        ctl.start()
        before = pids_of(ctl, *(running(ctl, n)["name"] for n in ("a", "b")))
        sub.chmod(0)
        agent(ctl, tag, "c")  # a successful part of the read still applies
        doc = reported_or_stopped(ctl, "a", before)
        assert "team" in cond(doc, "SourceReady")["message"], doc
        running(ctl, "c")
        # the directory stays unreadable for 3 s, as in the review, while re-reads go on every second
        holds(lambda: ctl.pids("a") == before["a"] and all(pid_alive(p) for p in before["a"]), 3.0,
              "a was disturbed while its directory could not be read")
        sub.chmod(0o755)
        source_ready(ctl, "a", "True")
        assert_undisturbed(ctl, before)
    finally:
        if sub.exists():
            sub.chmod(0o755)
        ctl.cleanup()


def test_a_dangling_manifest_symlink_keeps_its_agent(hctl: Controller, tag: str) -> None:
    outside = hctl.root / "checkout"
    outside.mkdir()
    target = outside / "a.yaml"
    target.write_text(manifest("a", ["sleep", "900001"], env={"FAULT_TAG": tag}))
    (hctl.manifests / "a.yaml").symlink_to(target)
    agent(hctl, tag, "b")
    hctl.start()
    before = pids_of(hctl, *(running(hctl, n)["name"] for n in ("a", "b")))
    target.rename(outside / "a.yaml.moving")  # the link now points nowhere
    agent(hctl, tag, "b", labels={"touched": "yes"})  # a file event: the controller reads the dir again
    doc = reported_or_stopped(hctl, "a", before)
    assert "a.yaml" in cond(doc, "SourceReady")["message"]
    (outside / "a.yaml.moving").rename(target)
    source_ready(hctl, "a", "True")
    assert_undisturbed(hctl, before)


def test_a_deleted_manifest_still_stops_its_agent_once_the_read_succeeds(hctl: Controller, tag: str) -> None:
    agent(hctl, tag, "a")
    agent(hctl, tag, "b")
    hctl.start()
    running(hctl, "a")
    pid = running(hctl, "b")["instances"][0]["pid"]
    hctl.delete("b.yaml")
    wait_for(lambda: hctl.status("b") is None and not pid_alive(pid), DEADLINE, message="b stopped and its status gone")
    assert cond(running(hctl, "a"), "SourceReady").get("status") == "True"


# -- 3. any file name -------------------------------------------------------------------------------

def test_file_names_that_are_not_utf8_are_shown_escaped_everywhere(hctl: Controller, tag: str) -> None:
    root = os.fsencode(hctl.manifests)
    good = manifest("cafe", ["sleep", "900002"], env={"FAULT_TAG": tag})
    bad = manifest("broken", ["sleep", "900003"], replicas=-1)
    with open(root + b"/caf\xe9.yaml", "w") as fh:
        fh.write(good)
    with open(root + b"/bad\xff.yaml", "w") as fh:
        fh.write(bad)
    hctl.start()
    doc = running(hctl, "cafe")
    assert doc["source"].endswith("caf\\xe9.yaml"), doc["source"]
    broken = hctl.wait_status("broken", lambda d: cond(d, "Valid").get("status") == "False", DEADLINE, "broken invalid")
    assert "bad\\xff.yaml" in cond(broken, "Valid")["message"]
    valid = metric_values(hctl, "agentctl_manifest_valid")
    assert any("caf\\\\xe9.yaml" in labels or "caf\\xe9.yaml" in labels for labels in valid), valid
    assert hctl.http("/readyz")[0] == 200
    # an edit is still written: the status writer is alive
    with open(root + b"/caf\xe9.yaml", "w") as fh:
        fh.write(manifest("cafe", ["sleep", "900002"], env={"FAULT_TAG": tag}, labels={"v": "2"}))
    hctl.wait_status("cafe", lambda d: d.get("labels") == {"v": "2"}, DEADLINE, "the edit applied")
    out = hctl.cli("validate", str(hctl.manifests))
    assert out.returncode == 1 and "bad\\xff.yaml:" in out.stdout, out
    assert hctl.stop() == 0
    hctl.start()  # and it starts again on the same store
    assert running(hctl, "cafe")["instances"][0]["pid"] == doc["instances"][0]["pid"]
    assert hctl.cli("get", "-o", "json").returncode == 0


# -- 4. only regular files, never blocking ----------------------------------------------------------

def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_fifos_devices_and_directories_are_not_read_and_block_nothing(hctl: Controller, tag: str) -> None:
    os.mkfifo(hctl.manifests / "fifo.yaml")
    (hctl.manifests / "zero.yaml").symlink_to("/dev/zero")
    (hctl.manifests / "dir.yaml").mkdir()
    secrets = hctl.root / "secrets.env"
    os.mkfifo(secrets)
    agent(hctl, tag, "envfifo", envFiles=[str(secrets)])
    agent(hctl, tag, "fine")
    started = time.monotonic()
    out = subprocess.run([PY, "-m", "controller", "validate", str(hctl.manifests), "--base-dir", str(hctl.root)],
                         capture_output=True, text=True, timeout=60, cwd=hctl.root)
    assert out.returncode == 1, out
    for name in ("fifo.yaml", "zero.yaml", "dir.yaml"):
        assert any(line.startswith(str(hctl.manifests / name) + ":") and "not a regular file" in line
                   for line in out.stdout.splitlines()), (name, out.stdout)
    assert any("envfifo.yaml:" in line and "envFiles[0]" in line and "not a regular file (a FIFO)" in line
               for line in out.stdout.splitlines()), out.stdout
    hctl.start()
    running(hctl, "fine")
    doc = hctl.wait_status("envfifo", lambda d: cond(d, "Valid").get("status") == "False", DEADLINE, "envfifo invalid")
    assert "not a regular file" in cond(doc, "Valid")["message"]
    agent(hctl, tag, "later")  # the loop still reacts
    running(hctl, "later")
    assert hctl.proc is not None
    assert rss_mib(hctl.proc.pid) < 300, rss_mib(hctl.proc.pid)
    print(f"validate of a FIFO, /dev/zero and a dir: {time.monotonic() - started:.2f}s including the controller start")


# -- 5. the watch survives a swap -------------------------------------------------------------------

def applied_within(ctl: Controller, tag: str, name: str) -> float:
    """Seconds from writing a new manifest to its agent in the API (the status file comes up to
    0.1 s later: its writer coalesces bursts)."""
    t0 = time.monotonic()
    agent(ctl, tag, name)
    wait_for(lambda: ctl.http(f"/api/v1/agents/{name}")[0] == 200, 20.0, interval=0.005,
             message=f"{name} picked up by the watch")
    return time.monotonic() - t0


def test_the_watch_follows_an_atomic_symlink_swap_of_the_manifests_dir(tmp_path: Path, tag: str,
                                                                         controller_factory: Callable[..., Controller]) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    link = tmp_path / "manifests"
    link.symlink_to(v1)
    ctl = controller_factory("c", manifests=link)
    agent(ctl, tag, "a")
    ctl.start("--resync", "600")  # only the watch can bring an edit in
    before = pids_of(ctl, running(ctl, "a")["name"])
    shutil.copytree(v1, v2)
    tmp_link = tmp_path / "manifests.tmp"
    tmp_link.symlink_to(v2)
    subprocess.run(["mv", "-T", str(tmp_link), str(link)], check=True)
    agent_in_v2 = manifest("b", ["sleep", "900004"], env={"FAULT_TAG": tag})
    (v2 / "b.yaml").write_text(agent_in_v2)
    running(ctl, "b", timeout=20.0)
    seconds = applied_within(ctl, tag, "c2")
    print(f"edit after a symlink swap applied in {seconds * 1000:.0f} ms")
    assert seconds < 10.0  # the resync is 600 s: only the watch can have done it
    assert_undisturbed(ctl, before)


def test_the_watch_survives_deleting_and_recreating_the_manifests_dir(hctl: Controller, tag: str) -> None:
    agent(hctl, tag, "a")
    hctl.start("--resync", "600")
    running(hctl, "a")
    pid = hctl.pids("a")[0]
    shutil.rmtree(hctl.manifests)
    # the files go first, then the dir: a read in between sees an empty dir (a deletion), after it none
    wait_for(lambda: "cannot read the manifest source" in hctl.log() or not pid_alive(pid), DEADLINE,
             message="the removal noticed")
    hctl.manifests.mkdir()
    seconds = applied_within(hctl, tag, "b")
    print(f"edit after re-creating the dir applied in {seconds * 1000:.0f} ms")
    assert seconds < 10.0
    running(hctl, "b")
    seconds = applied_within(hctl, tag, "c")
    print(f"a second edit applied in {seconds * 1000:.0f} ms")
    assert seconds < 10.0


# -- 9. the Git source exports only its path, under a size limit -------------------------------------

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def git(*args: str, cwd: Path, stdin: str | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, timeout=120,
                          input=stdin)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def git_bomb(work: Path, levels: int = 3, fanout: int = 16, blob_bytes: int = 1 << 20) -> str:
    """A tree of fanout**levels entries that all point at one blob: tiny in the repository,
    fanout**levels * blob_bytes once checked out. Returns the top tree's id."""
    blob = work / "bomb.blob"
    blob.write_bytes(b"x" * blob_bytes)
    obj = git("hash-object", "-w", str(blob), cwd=work)
    blob.unlink()
    kind, mode = "blob", "100644"
    for _ in range(levels):
        entries = "".join(f"{mode} {kind} {obj}\tn{i:02d}\n" for i in range(fanout))
        obj = git("mktree", cwd=work, stdin=entries)
        kind, mode = "tree", "040000"
    return obj


def commit_all(work: Path, message: str, bare: Path, *, bomb_at: str | None = None) -> str:
    git("add", "--all", cwd=work)
    if bomb_at is not None:
        git("read-tree", f"--prefix={bomb_at}/", git_bomb(work), cwd=work)
    git("commit", "--quiet", "-m", message, cwd=work)
    git("push", "--quiet", str(bare), "HEAD:refs/heads/main", cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


class GitController(Controller):
    def __init__(self, root: Path, url: str, *extra: str) -> None:
        super().__init__(root)
        self.url, self.extra = url, extra

    def args(self, *extra: str) -> list[str]:
        return [PY, "-m", "controller", "run", "--git-url", self.url, "--git-path", "agents", "--git-interval", "0.5",
                *self.extra, "--state-dir", str(self.state), "--base-dir", str(self.base),
                "--metrics-addr", "127.0.0.1:0", *extra]


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_git_exports_only_its_path_and_refuses_a_revision_over_the_limit(tmp_path: Path, tag: str) -> None:
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    work.mkdir()
    git("init", "--quiet", "--bare", "--initial-branch=main", str(bare), cwd=tmp_path)
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    (work / "agents").mkdir()
    (work / "agents/a.yaml").write_text(manifest("a", ["sleep", "900005"], env={"FAULT_TAG": tag}))
    (work / "assets").mkdir()
    with open(work / "assets/model.bin", "wb") as fh:  # 150 MiB outside the path, sparse on this side
        fh.truncate(150 << 20)
    first = commit_all(work, "a, a big file and a git bomb outside the path", bare, bomb_at="vendor/bomb")
    ctl = GitController(tmp_path / "c", str(bare), "--git-max-bytes", "20Mi")
    try:
        ctl.start(wait_ready=False)
        ctl.wait_ready(60.0)
        doc = ctl.wait_status("a", lambda d: d.get("phase") == "Running", 60.0, "a Running from Git")
        assert doc["sourceRevision"] == first and cond(doc, "SourceReady")["status"] == "True"
        exported = ctl.state / "git" / f"rev-{first}"
        assert sorted(p.name for p in exported.iterdir()) == ["agents"], list(exported.iterdir())
        assert ctl.proc is not None
        peak = peak_rss_mib(ctl.proc.pid)
        print(f"controller peak RSS with 150 MiB + a 4 GiB bomb outside the path: {peak:.0f} MiB")
        assert peak < 200, peak
        pid = doc["instances"][0]["pid"]
        # the next revision puts a 4 GiB (expanded) bomb under the path and edits a: refused whole
        (work / "agents/a.yaml").write_text(manifest("a", ["sleep", "900006"], env={"FAULT_TAG": tag}))
        second = commit_all(work, "a bomb under the path", bare, bomb_at="agents/bomb")
        doc = source_ready(ctl, "a", "False", 60.0)
        message = cond(doc, "SourceReady")["message"]
        assert second in message and str(20 << 20) in message, message
        assert doc["sourceRevision"] == first and ctl.pids("a") == [pid] and pid_alive(pid)
        assert not any((ctl.state / "git").glob(f"*{second}*")), list((ctl.state / "git").iterdir())
        peak = peak_rss_mib(ctl.proc.pid)
        print(f"controller peak RSS after refusing the bomb: {peak:.0f} MiB")
        assert peak < 200, peak
        # and a good revision after it applies
        git("rm", "-r", "--quiet", "--cached", "agents/bomb", cwd=work)
        third = commit_all(work, "bomb removed", bare)
        doc = ctl.wait_status("a", lambda d: d.get("sourceRevision") == third and d.get("phase") == "Running"
                              and cond(d, "SourceReady").get("status") == "True", 60.0, "the good revision applied")
        assert ctl.pids("a") != [pid]  # the edit of a (SpecChanged) came with it
    finally:
        ctl.cleanup()


# -- 10. log rotation keeps pace with the writer ----------------------------------------------------

ROT_MAX = 1 << 20
ROT_BACKUPS = 2
ROT_RATE = 20 << 20  # bytes per second: 20 maxBytes a second
SLACK_SECONDS = 0.5  # of output past the bound: one check interval (tens of ms) plus a busy box's lag


def flooder(rate: int, seconds: float) -> list[str]:
    return [PY, "-u", "-c", f"""
import os, time
chunk = b"y" * 65535 + b"\\n"
began = time.monotonic()
sent = 0
while time.monotonic() - began < {seconds}:
    ahead = sent / {rate} - (time.monotonic() - began)
    if ahead > 0:
        time.sleep(ahead)
    os.write(1, chunk)
    sent += len(chunk)
print("done", sent, time.monotonic() - began, flush=True)
while True:
    time.sleep(1)
"""]


def test_logs_of_a_fast_writer_stay_within_backups_plus_one_times_max_bytes(hctl: Controller, tag: str) -> None:
    hctl.write("flood.yaml", manifest("flood", flooder(ROT_RATE, 4.0), env={"FAULT_TAG": tag},
                                      logs={"maxBytes": ROT_MAX, "backups": ROT_BACKUPS}))
    hctl.start()
    running(hctl, "flood")
    logs = hctl.state / "logs"
    peak = 0
    names: set[str] = set()

    def total() -> int:
        size = 0
        for path in logs.glob("flood-0.log*"):
            names.add(path.name)
            try:
                size += path.stat().st_size
            except FileNotFoundError:
                continue
        return size

    def finished() -> bool:
        nonlocal peak
        peak = max(peak, total())
        return "done" in (logs / "flood-0.log").read_text(errors="replace")[-200:] if (logs / "flood-0.log").exists() else False

    wait_for(finished, 60.0, interval=0.005, message="the writer done")
    bound = (ROT_BACKUPS + 1) * ROT_MAX + ROT_RATE * SLACK_SECONDS
    print(f"20 MiB/s into maxBytes 1 MiB x {ROT_BACKUPS} backups: peak on disk {peak / (1 << 20):.1f} MiB "
          f"(bound {bound / (1 << 20):.1f} MiB)")
    assert f"flood-0.log.{ROT_BACKUPS}" in names, names
    assert peak <= bound, (peak, bound)
    assert names <= {"flood-0.log"} | {f"flood-0.log.{n}" for n in range(1, ROT_BACKUPS + 1)}, names
    assert (hctl.status("flood") or {}).get("restarts") == 0


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_a_git_revision_with_a_file_name_that_is_not_utf8_loads_with_the_name_escaped(tmp_path: Path) -> None:
    """The same loader path as a directory, through a real export (every host of a fleet reads it)."""

    bare, work = tmp_path / "repo.git", tmp_path / "work"
    work.mkdir()
    git("init", "--quiet", "--bare", "--initial-branch=main", str(bare), cwd=tmp_path)
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    (work / "agents").mkdir()
    with open(os.fsencode(work / "agents") + b"/caf\xe9.yaml", "w") as fh:
        fh.write(manifest("cafe", ["sleep", "900007"]))
    sha = commit_all(work, "a name that is not UTF-8", bare)
    src = GitSource(str(bare), ref=None, path="agents", workdir=tmp_path / "state" / "git")
    assert src.sync().revision == sha
    root = src.manifests_root()
    assert root is not None
    result = ManifestSource(root, base_dir=tmp_path, providers=frozenset(BUILTIN)).load()
    assert result.manifests["cafe"].source == f"{root}/caf\\xe9.yaml"
    store = Store(tmp_path / "state.db")  # the write that used to raise UnicodeEncodeError
    store.put_agent(AgentRow("cafe", result.manifests["cafe"].source, None, None, 0.0, sha))
    store.commit()
    assert store.agents()["cafe"].source.endswith("caf\\xe9.yaml")
    store.close()
