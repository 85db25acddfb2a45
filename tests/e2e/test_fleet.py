"""A fleet on one machine: a bare Git repository and two `agentctl run` controllers reading it.

CONTRACT §7 end to end with real pieces: `git init --bare`, commits pushed from a test
working tree, two controllers with their own --host-name, labels and state dirs. Every
push is awaited on both hosts with a deadline (the poll interval is 0.5 s); nothing sleeps
to let things settle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PY, Controller, manifest, pid_alive, py, sleeper, wait_for

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="the git binary is not installed")

DEADLINE = 30.0  # a noisy shared 2-core box: generous, never relied on for speed
INTERVAL = "0.5"  # --git-interval: the propagation delay of a push
# the test's own git calls ignore any user or system config (signing, hooks, default branch)
GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}


# -- the repository ----------------------------------------------------------------
def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"git {' '.join(args)} failed: {done.stderr}"
    return done.stdout.strip()


class Repo:
    """A bare repository (what the controllers fetch) and a working tree that pushes to it."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "fleet.git"
        self.work = root / "work"
        self.work.mkdir(parents=True)
        git("init", "--quiet", "--bare", "--initial-branch=main", str(self.bare), cwd=root)
        git("init", "--quiet", "--initial-branch=main", cwd=self.work)

    @property
    def url(self) -> str:
        return str(self.bare)

    def push(self, files: dict[str, str | None], message: str, *, branch: str = "main",
             to: Path | None = None) -> str:
        """Write (or, for None, delete) files, commit, push; the new commit's full sha."""
        if branch != "main":
            git("checkout", "--quiet", "-B", branch, cwd=self.work)
        for rel, text in files.items():
            path = self.work / rel
            if text is None:
                path.unlink()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git("add", "--all", cwd=self.work)
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "--allow-empty", "-m", message,
            cwd=self.work)
        git("push", "--quiet", str(to or self.bare), f"HEAD:refs/heads/{branch}", cwd=self.work)
        sha = git("rev-parse", "HEAD", cwd=self.work)
        if branch != "main":
            git("checkout", "--quiet", "main", cwd=self.work)
        return sha


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A repository whose manifests live under agents/; outside it is a YAML that is no manifest."""
    r = Repo(tmp_path / "repo")
    r.push({"agents/README.md": "manifests of the fleet\n", "ci/lint.yaml": "steps: [validate]\n"}, "initial")
    return r


# -- controllers on hosts -------------------------------------------------------------
class HostController(Controller):
    """`agentctl run` reading the Git repository as one host of the fleet."""

    def __init__(self, root: Path, *, url: str, host: str, labels: str = "") -> None:
        super().__init__(root)
        self.url, self.host, self.labels = url, host, labels

    def start(self, *extra: str, wait_ready: bool = True) -> HostController:
        super().start(*extra, wait_ready=wait_ready)
        return self

    def source_args(self) -> list[str]:
        args = ["--git-url", self.url, "--git-path", "agents", "--host-name", self.host]
        return args + (["--host-labels", self.labels] if self.labels else [])

    def args(self, *extra: str) -> list[str]:
        return [PY, "-m", "controller", "run", *self.source_args(), "--git-interval", INTERVAL,
                "--state-dir", str(self.state), "--base-dir", str(self.base), "--metrics-addr", "127.0.0.1:0", *extra]

    def plan(self) -> list[str]:
        done = self.cli("plan", *self.source_args())
        assert done.returncode == 0, f"plan failed: {done.stderr}"
        return done.stdout.splitlines()

    def api_items(self) -> dict[str, dict[str, Any]]:
        code, body = self.http("/api/v1/agents")
        assert code == 200, body
        return {item["name"]: item for item in json.loads(body)["items"]}

    def status_names(self) -> set[str]:
        return {p.stem for p in (self.state / "status").glob("*.yaml")}


Make = Callable[..., HostController]


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Make]:
    """Controllers for named hosts; each controller and every agent it started is killed at the end."""
    made: list[HostController] = []

    def make(host: str, repo: Repo, labels: str = "") -> HostController:
        root = tmp_path / host
        root.mkdir()
        ctl = HostController(root, url=repo.url, host=host, labels=labels)
        made.append(ctl)
        return ctl

    yield make
    for ctl in made:
        ctl.cleanup()


# -- status predicates -------------------------------------------------------------------
def condition(doc: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in doc.get("conditions", []) if c["type"] == kind), None)


def cond_is(doc: dict[str, Any], kind: str, value: str) -> bool:
    c = condition(doc, kind)
    return c is not None and c["status"] == value


def running_at(revision: str) -> Callable[[dict[str, Any]], bool]:
    """Running with a live pid, on the given revision, with the source reachable."""
    def pred(doc: dict[str, Any]) -> bool:
        return (doc.get("phase") == "Running" and doc.get("sourceRevision") == revision
                and cond_is(doc, "SourceReady", "True") and bool(doc.get("instances"))
                and bool(doc["instances"][0].get("pid")))
    return pred


def pid_on(ctl: HostController, name: str, revision: str) -> int:
    doc = ctl.wait_status(name, running_at(revision), DEADLINE, f"{name} Running at {revision[:8]} on {ctl.host}")
    return int(doc["instances"][0]["pid"])


def wait_gone(ctl: HostController, name: str, pid: int) -> None:
    """No status file for name on this host any more, and its process is dead."""
    wait_for(lambda: ctl.status(name) is None and not pid_alive(pid), DEADLINE,
             message=f"{name} (pid {pid}) stopped and its status removed on {ctl.host}")


def pinned(*hosts: str) -> dict[str, Any]:
    return {"hosts": list(hosts)}


def ignore_term() -> list[str]:
    """Ignores SIGTERM; says `ready` once the handler is in place."""
    return py("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        while True: time.sleep(1)
    """)


def eventually(pred: Callable[[], object], message: str) -> None:
    """For the HTTP snapshot, which is swapped in just after the status files are written."""
    wait_for(pred, DEADLINE, message=message)


def broken(name: str, **spec: Any) -> str:
    """A manifest that names its agent but fails validation (an unknown field)."""
    return manifest(name, **spec).replace("spec:\n", "spec:\n  bogus: 1\n", 1)


def info_series(ctl: HostController) -> set[str]:
    """Agents with an agentctl_agent_info series on this host (what the fleet alerts count)."""
    code, body = ctl.http("/metrics")
    assert code == 200
    lines = body.decode().splitlines()
    return {line.split('agent="', 1)[1].split('"', 1)[0] for line in lines if line.startswith("agentctl_agent_info{")}


# -- tests ---------------------------------------------------------------------------------
def test_pushes_that_add_move_and_delete_agents_converge_on_both_hosts(repo: Repo, hosts: Make) -> None:
    a = hosts("host-a", repo, "zone=eu").start()
    b = hosts("host-b", repo, "gpu=true,zone=eu").start()
    # the first fetch, which can take a while, is announced before the first pass starts
    log = a.log()
    assert f"fetching {repo.url}" in log and log.index(f"fetching {repo.url}") < log.index("first reconcile pass done")

    # add: one agent for every host, one pinned by name, one placed by label
    c1 = repo.push({
        "agents/everywhere.yaml": manifest("everywhere"),
        "agents/pinned.yaml": manifest("pinned", placement=pinned("host-a")),
        "agents/gpu.yaml": manifest("gpu", placement={"hostLabels": {"gpu": "true"}}),
    }, "add three agents")
    every_a, every_b = pid_on(a, "everywhere", c1), pid_on(b, "everywhere", c1)
    pinned_a = pid_on(a, "pinned", c1)
    pid_on(b, "gpu", c1)
    assert every_a != every_b
    # placed elsewhere: no status file, nothing in the API or metrics, `noop NAME NotPlaced` in plan
    assert a.status_names() == {"everywhere", "pinned"} and b.status_names() == {"everywhere", "gpu"}
    eventually(lambda: {n: i["sourceRevision"] for n, i in a.api_items().items()} == {"everywhere": c1, "pinned": c1},
               "host-a's API lists its two agents at c1")
    assert a.http("/api/v1/agents/gpu")[0] == 404
    eventually(lambda: info_series(a) == {"everywhere", "pinned"} and info_series(b) == {"everywhere", "gpu"},
               "agentctl_agent_info series only for the agents placed on each host")
    assert b"lint.yaml" not in a.http("/metrics")[1]  # outside --git-path: never read
    assert "noop pinned NotPlaced" in b.plan()
    assert "noop gpu NotPlaced" in a.plan()

    # move: the old host stops it, the new host starts it; an unchanged agent only advances its revision
    c2 = repo.push({"agents/pinned.yaml": manifest("pinned", placement=pinned("host-b"))}, "move pinned to host-b")
    pinned_b = pid_on(b, "pinned", c2)
    wait_gone(a, "pinned", pinned_a)
    assert pid_on(a, "everywhere", c2) == every_a and pid_on(b, "everywhere", c2) == every_b
    assert "noop pinned NotPlaced" in a.plan()
    eventually(lambda: info_series(a) == {"everywhere"}, "pinned's series gone from host-a")

    # delete one agent and move the other back in the same push
    c3 = repo.push({"agents/everywhere.yaml": None,
                    "agents/pinned.yaml": manifest("pinned", placement=pinned("host-a"))}, "delete, move back")
    wait_gone(a, "everywhere", every_a)
    wait_gone(b, "everywhere", every_b)
    wait_gone(b, "pinned", pinned_b)
    assert pid_on(a, "pinned", c3) != pinned_a
    pid_on(b, "gpu", c3)
    assert a.status_names() == {"pinned"} and b.status_names() == {"gpu"}


def test_invalid_push_keeps_the_last_good_revision_running_on_both_hosts(repo: Repo, hosts: Make) -> None:
    fleet = (hosts("host-a", repo).start(), hosts("host-b", repo).start())
    c1 = repo.push({"agents/shared.yaml": manifest("shared"),
                    "agents/other.yaml": manifest("other", env={"ROUND": "1"})}, "two agents for every host")
    good: dict[str, dict[str, Any]] = {}
    for ctl in fleet:
        pid_on(ctl, "other", c1)
        pid_on(ctl, "shared", c1)
        good[ctl.host] = ctl.status("shared") or {}

    c2 = repo.push({"agents/shared.yaml": broken("shared"), "agents/other.yaml": manifest("other", env={"ROUND": "2"})},
                   "break shared, change other")
    for ctl in fleet:
        pid_on(ctl, "other", c2)  # the valid agent of the same push advances
        doc = ctl.wait_status("shared", lambda d: cond_is(d, "Valid", "False"), DEADLINE,
                              f"shared Valid=False on {ctl.host}")
        before = good[ctl.host]
        assert "bogus" in condition(doc, "Valid")["message"]  # type: ignore[index]
        # still the last good spec and revision, same process
        assert doc["phase"] == "Running" and doc["sourceRevision"] == c1, doc
        assert doc["specHash"] == before["specHash"]
        assert doc["instances"][0]["pid"] == before["instances"][0]["pid"]
        assert pid_alive(doc["instances"][0]["pid"])
        eventually(lambda: {n: i["sourceRevision"] for n, i in ctl.api_items().items()} == {"shared": c1, "other": c2},
                   f"the API of {ctl.host} at the same revisions")

    # fixed: valid again at the new revision, same process (only a label changed)
    c3 = repo.push({"agents/shared.yaml": manifest("shared", labels={"fixed": "yes"})}, "fix shared")
    for ctl in fleet:
        doc = ctl.wait_status("shared", lambda d: running_at(c3)(d) and cond_is(d, "Valid", "True"), DEADLINE,
                              f"shared valid at {c3[:8]} on {ctl.host}")
        assert doc["instances"][0]["pid"] == good[ctl.host]["instances"][0]["pid"]


def test_fetch_failure_is_reported_on_every_status_and_recovers(repo: Repo, hosts: Make, tmp_path: Path) -> None:
    a = hosts("host-a", repo).start()
    b = hosts("host-b", repo).start()
    c1 = repo.push({"agents/alpha.yaml": manifest("alpha"),
                    "agents/beta.yaml": manifest("beta", placement=pinned("host-a"))}, "alpha everywhere, beta on a")
    placed = {a: ("alpha", "beta"), b: ("alpha",)}
    pids = {(ctl.host, n): pid_on(ctl, n, c1) for ctl, names in placed.items() for n in names}
    moved = tmp_path / "elsewhere.git"

    def repository_gone() -> None:
        os.rename(repo.bare, moved)
        for ctl, names in placed.items():
            for name in names:
                doc = ctl.wait_status(name, lambda d: cond_is(d, "SourceReady", "False"), DEADLINE,
                                      f"{name} SourceReady=False on {ctl.host}")
                # everything keeps running on the last good revision
                assert doc["phase"] == "Running" and doc["sourceRevision"] == c1, doc
                assert doc["instances"][0]["pid"] == pids[(ctl.host, name)] and pid_alive(pids[(ctl.host, name)])
                assert condition(doc, "SourceReady")["message"], doc  # type: ignore[index]
            eventually(lambda: {n: cond_is(i, "SourceReady", "False") for n, i in ctl.api_items().items()}
                       == dict.fromkeys(names, True), f"SourceReady=False in the API of {ctl.host}")
            assert "git fetch" in ctl.log() and "failed" in ctl.log()

    # back with nothing new: reported as recovered on the same revision
    repository_gone()
    os.rename(moved, repo.bare)
    for ctl, names in placed.items():
        for name in names:
            assert pid_on(ctl, name, c1) == pids[(ctl.host, name)]

    # a commit lands while the controllers cannot see it; once the repository is back they converge on it
    repository_gone()
    c2 = repo.push({"agents/gamma.yaml": manifest("gamma", command=sleeper("gamma"))}, "add gamma", to=moved)
    os.rename(moved, repo.bare)
    for ctl, names in placed.items():
        for name in names:
            assert pid_on(ctl, name, c2) == pids[(ctl.host, name)]
        pid_on(ctl, "gamma", c2)


def test_plan_reads_the_fetched_revision_of_a_ref_and_changes_nothing(repo: Repo, tmp_path: Path) -> None:
    repo.push({"agents/everywhere.yaml": manifest("everywhere"),
               "agents/gpu.yaml": manifest("gpu", placement={"hostLabels": {"gpu": "true"}}),
               "agents/both.yaml": manifest("both", placement={"hosts": ["host-a", "host-b"],
                                                               "hostLabels": {"gpu": "true"}})}, "main")
    repo.push({"agents/staging.yaml": manifest("staging", placement=pinned("host-a"))}, "staging only",
              branch="staging")
    state = tmp_path / "plan-state"

    def plan(*args: str) -> list[str]:
        done = subprocess.run([PY, "-m", "controller", "plan", "--git-url", repo.url, "--git-path", "agents",
                               "--state-dir", str(state), *args], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return sorted(done.stdout.splitlines())

    assert plan("--host-name", "host-a") == [
        "create everywhere-0 Created", "noop both NotPlaced", "noop gpu NotPlaced"]
    assert plan("--host-name", "host-b", "--host-labels", "gpu=true") == [
        "create both-0 Created", "create everywhere-0 Created", "create gpu-0 Created"]
    assert plan("--host-name", "host-c", "--host-labels", "gpu=true") == [
        "create everywhere-0 Created", "create gpu-0 Created", "noop both NotPlaced"]
    assert plan("--host-name", "host-a", "--git-ref", "staging") == [
        "create everywhere-0 Created", "create staging-0 Created", "noop both NotPlaced", "noop gpu NotPlaced"]
    assert plan("--host-name", "host-b", "--git-ref", "staging") == [
        "create everywhere-0 Created", "noop both NotPlaced", "noop gpu NotPlaced", "noop staging NotPlaced"]
    assert not state.exists(), "plan wrote into the state dir"

    both = subprocess.run([PY, "-m", "controller", "run", "--git-url", repo.url, "--manifests", str(tmp_path),
                           "--state-dir", str(state)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert both.returncode == 2, both.stderr


# -- known bugs ------------------------------------------------------------------------------
def test_restart_with_an_invalid_manifest_placed_elsewhere_starts_nothing(repo: Repo, hosts: Make) -> None:
    a = hosts("host-a", repo).start()
    b = hosts("host-b", repo).start()
    c1 = repo.push({"agents/here.yaml": manifest("here"),
                    "agents/there.yaml": manifest("there", placement=pinned("host-b"))}, "there on b")
    pid_on(a, "here", c1)
    there_b = pid_on(b, "there", c1)
    c2 = repo.push({"agents/there.yaml": broken("there", placement=pinned("host-b"))}, "break there")
    b.wait_status("there", lambda d: cond_is(d, "Valid", "False"), DEADLINE, "there Valid=False on host-b")
    pid_on(a, "here", c2)  # host-a has loaded the broken revision too

    assert a.stop() == 0
    a.start()  # ready: the first reconcile pass is done, anything it started has a status
    assert a.status("there") is None, f"host-a runs an agent placed on host-b: {a.status('there')}"
    assert "noop there NotPlaced" in a.plan()
    assert (b.status("there") or {})["instances"][0]["pid"] == there_b


def test_a_revision_without_the_git_path_is_reported(repo: Repo, hosts: Make) -> None:
    a = hosts("host-a", repo).start()
    c1 = repo.push({"agents/last.yaml": manifest("last")}, "one agent")
    pid = pid_on(a, "last", c1)
    c2 = repo.push({"agents/last.yaml": None, "agents/README.md": None}, "delete the last agent: agents/ is gone")
    # whatever it decides, the status names the new revision once the controller has seen it
    doc = a.wait_status("last", lambda d: cond_is(d, "SourceReady", "False")
                        or c2 in (condition(d, "SourceReady") or {}).get("message", ""), DEADLINE,
                        f"SourceReady=False, or naming {c2[:8]}")
    source_ready = condition(doc, "SourceReady") or {}
    assert source_ready["status"] == "False" and "agents" in source_ready["message"], source_ready
    assert doc["sourceRevision"] == c1 and pid_alive(pid)


def test_a_fetch_failure_names_its_cause(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.git"
    done = subprocess.run([PY, "-m", "controller", "plan", "--git-url", str(missing), "--state-dir",
                           str(tmp_path / "state")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert str(missing) in done.stderr, done.stderr
    assert "does not appear to be a git repository" in done.stderr, done.stderr


def test_the_old_host_reports_a_moved_agent_until_its_process_is_gone(repo: Repo, hosts: Make) -> None:
    a = hosts("host-a", repo).start()
    b = hosts("host-b", repo).start()
    slow = {"stop": {"signal": "SIGTERM", "gracePeriodSeconds": 60}}
    c1 = repo.push({"agents/mover.yaml": manifest("mover", ignore_term(), placement=pinned("host-a"), **slow)},
                   "mover on a")
    pid = pid_on(a, "mover", c1)
    log = a.state / "logs" / "mover-0.log"
    wait_for(lambda: log.exists() and "ready" in log.read_text(), DEADLINE, message="SIGTERM ignored")
    c2 = repo.push({"agents/mover.yaml": manifest("mover", ignore_term(), placement=pinned("host-b"), **slow)},
                   "move mover to b")
    pid_on(b, "mover", c2)

    def stopping_or_gone() -> dict[str, Any] | None:
        doc = a.status("mover")
        if doc is None:
            return {"phase": "(no status file)"}
        return doc if doc.get("phase") == "Stopping" else None

    doc = wait_for(stopping_or_gone, DEADLINE, message="mover Stopping or gone on host-a") or {}
    assert pid_alive(pid), "the SIGTERM-ignoring instance died before its grace period ended"
    assert doc.get("phase") == "Stopping", f"host-a hides its still running instance of mover: {doc}"
    eventually(lambda: "mover" in info_series(a), "mover's series on host-a while it still runs there")
