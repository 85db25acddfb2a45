"""Test helpers: waiting on conditions with deadlines, and a real `agentctl run` subprocess.

Every process a test causes is found again by pid or process group and killed at the end:
the controller by its own group, agents by the AGENTCTL_CONTROLLER_ID marker in their env.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
PY = sys.executable


def wait_for(pred: Callable[[], T], timeout: float = 20.0, interval: float = 0.02, message: str = "") -> T:
    """Poll pred until it returns something truthy; fail with message after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or pred} (last value: {last!r})")


def manifest(name: str, command: list[str] | None = None, **spec: Any) -> str:
    body: dict[str, Any] = {"apiVersion": "agentctl/v1", "kind": "Agent", "metadata": {"name": name},
                            "spec": {"command": command or sleeper(), **spec}}
    if "labels" in spec:
        body["metadata"]["labels"] = body["spec"].pop("labels")
    return yaml.safe_dump(body, sort_keys=False)


def py(code: str) -> list[str]:
    return [PY, "-u", "-c", textwrap.dedent(code)]


def sleeper(text: str = "up") -> list[str]:
    return py(f"import time\nprint({text!r}, flush=True)\nwhile True: time.sleep(1)")


def log_text(ctl: "Controller", instance: str) -> str:
    """The instance's log as the controller wrote it ("" before it exists)."""
    try:
        return (ctl.state / "logs" / f"{instance}.log").read_text(errors="replace")
    except OSError:
        return ""


def wait_log(ctl: "Controller", instance: str, needle: str, timeout: float = 30.0) -> str:
    def found() -> str | None:
        text = log_text(ctl, instance)
        return text if needle in text else None
    text = wait_for(found, timeout, message=f"{needle!r} in the log of {instance}")
    assert text is not None
    return text


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def marked_pids(controller_id: str) -> list[int]:
    """Live processes whose environment carries this controller's marker."""
    needle = f"AGENTCTL_CONTROLLER_ID={controller_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0") and pid_alive(int(name)):
                    found.append(int(name))
        except OSError:
            continue
    return found


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def remove_cgroups(controller_id: str) -> None:
    """Kill what is left in this controller's instance cgroups (cgroup.kill) and remove them."""
    from controller import cgroups

    base = cgroups.base_dir(controller_id)
    if base is None or not base.is_dir():
        return
    for leaf in [p for p in base.iterdir() if p.is_dir()]:
        pids = cgroups.procs(leaf)
        cgroups.signal(leaf, signal.SIGKILL)
        for pid in pids:
            reap(pid)
        wait_for(lambda: not cgroups.procs(leaf), 10, message=f"{leaf} empty")  # noqa: B023
        for pid in pids:
            reap(pid)
        cgroups.remove(leaf)
    cgroups.remove(base)


class Controller:
    """`agentctl run` as a subprocess against temp dirs, like a user would start it."""

    def __init__(self, root: Path, *, manifests: Path | None = None, state: Path | None = None,
                 base: Path | None = None) -> None:
        self.root = root
        self.manifests = manifests or root / "manifests"
        self.state = state or root / "state"
        self.base = base or root
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "controller.log"
        self.port = 0
        self.pgids: set[int] = set()

    # -- files ---------------------------------------------------------------
    def write(self, name: str, text: str) -> Path:
        path = self.manifests / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic, as an editor or git would
        return path

    def apply(self, name: str, command: list[str] | None = None, **spec: Any) -> Path:
        return self.write(f"{name}.yaml", manifest(name, command, **spec))

    def delete(self, name: str) -> None:
        (self.manifests / name).unlink()

    # -- process -------------------------------------------------------------
    def args(self, *extra: str) -> list[str]:
        return [PY, "-m", "controller", "run", "--manifests", str(self.manifests), "--state-dir", str(self.state),
                "--base-dir", str(self.base), "--metrics-addr", "127.0.0.1:0", *extra]

    def start(self, *extra: str, wait_ready: bool = True) -> Controller:
        (self.state / "controller.json").unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args(*extra), stdout=log, stderr=log, start_new_session=True,
                                     cwd=self.root)
        log.close()
        self.pgids.add(self.proc.pid)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"controller exited {self.proc.returncode}:\n{self.log()}")
            try:
                info = json.loads((self.state / "controller.json").read_text())
            except (OSError, ValueError):
                return False
            if info.get("pid") != self.proc.pid:
                return False
            self.port = int(info["metricsAddr"].rsplit(":", 1)[1])
            return self.http("/readyz")[0] == 200
        wait_for(ready, timeout, message="controller /readyz")

    def http(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def kill(self) -> None:
        """SIGKILL the controller alone (its agents live on, as after a crash)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- state ---------------------------------------------------------------
    def status(self, name: str) -> dict[str, Any] | None:
        try:
            doc = yaml.safe_load((self.state / "status" / f"{name}.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None
        return doc if isinstance(doc, dict) else None

    def wait_status(self, name: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0,
                    message: str = "") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            doc = self.status(name)
            return doc if doc is not None and pred(doc) else None
        try:
            return wait_for(check, timeout, message=message or f"status of {name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstatus now: {self.status(name)}\ncontroller log:\n{self.log()[-4000:]}") from None

    def wait_phase(self, name: str, phase: str, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_status(name, lambda d: d.get("phase") == phase, timeout, f"{name} phase {phase}")

    def pids(self, name: str) -> list[int]:
        doc = self.status(name) or {}
        return [i["pid"] for i in doc.get("instances", []) if i.get("pid")]

    def controller_id(self) -> str | None:
        try:
            db = sqlite3.connect(f"file:{self.state / 'state.db'}?mode=ro", uri=True, timeout=5)
            row = db.execute("SELECT value FROM meta WHERE key = 'controller_id'").fetchone()
            db.close()
            return row[0] if row else None
        except sqlite3.Error:
            return None

    def cli(self, *args: str, timeout: float = 60.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [PY, "-m", "controller", *args]
        if args and args[0] not in ("validate", "schema"):
            cmd += ["--state-dir", str(self.state)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root, input=input)

    def cleanup(self) -> None:
        """Kill the controller's group and every agent process it caused."""
        cid = self.controller_id()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pgid in self.pgids:
            kill_group(pgid)
        if cid:
            remove_cgroups(cid)
            for _ in range(3):
                pids = marked_pids(cid)
                if not pids:
                    break
                for pid in pids:
                    kill_group(os.getpgid(pid) if pid_alive(pid) else pid)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    reap(pid)
                time.sleep(0.05)
