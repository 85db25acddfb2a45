"""Per-instance cgroups (v2): where they may be made, membership, signals, memory, removal.

Effects layer, used by the process and tmux adapters, by health (memory) and by procfs
(finding our processes after a store loss). Every path is under
`<controller's own cgroup>/agentctl-<controller id>/`; nothing here decides when to stop.
`AGENTCTL_CGROUPS=off` turns it off: tracking then stays process group + marker env.
"""

from __future__ import annotations

import logging
import os
import re
import signal as signals
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agentctl.cgroups")
SWITCH = "AGENTCTL_CGROUPS"  # "off" disables cgroup tracking (tests use it to check the fallback)
PREFIX = "agentctl-"
KILL_ROUNDS = 20  # without cgroup.kill (kernel < 5.14): kill what is listed, a bounded number of times
SH = "/bin/sh"
# The trampoline in front of a `process` instance: the child moves itself into the cgroup, then
# execs argv ("$@", never parsed by the shell). The move runs in the child, after the controller's
# cheap vfork: its cost (an RCU grace period in the kernel) never holds up the reconcile loop, and
# nothing the command forks can be born outside the cgroup.
JOIN_SCRIPT = 'echo 0 > "$1/cgroup.procs" || exit 126; shift; exec "$@"'
JOIN_FAILED = 126
# <instance>.<run>.<spec hash with ':' as '_'>: everything recovery needs without reading environ
NAME_RE = re.compile(r"^(?P<instance>[a-z0-9][-a-z0-9]*)\.(?P<run>[0-9a-f]*)\.(?P<hash>[A-Za-z0-9_]*)$")


@dataclass(frozen=True)
class Member:
    """A live process found in one of our instance cgroups."""

    pid: int
    instance: str
    run: str
    spec_hash: str
    cgroup: str


# -- pure: names and parsing ------------------------------------------------------------


def leaf_name(instance_id: str, run_id: str, spec_hash: str) -> str:
    return f"{instance_id}.{run_id}.{spec_hash.replace(':', '_')}"


def parse_leaf(name: str) -> tuple[str, str, str] | None:
    """leaf_name's inverse: (instance, run, spec hash) or None for a name we did not make."""
    match = NAME_RE.match(name)
    if match is None:
        return None
    return match["instance"], match["run"], match["hash"].replace("_", ":", 1)


def join_argv(cgroup: Path | str, argv: Sequence[str]) -> list[str]:
    """argv run inside `cgroup` from its first instruction; argv's words are passed, not parsed."""
    return [SH, "-c", JOIN_SCRIPT, "agentctl-join", str(cgroup), *argv]


def v2_mount(mountinfo: str) -> tuple[str, str] | None:
    """(mount point, root inside the hierarchy) of the first cgroup2 mount in /proc/self/mountinfo."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) > sep + 1 and fields[sep + 1] == "cgroup2" and len(fields) > 4:
            return unescape(fields[4]), unescape(fields[3])
    return None


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def v2_path(proc_cgroup: str) -> str | None:
    """The '0::PATH' line of /proc/PID/cgroup (the unified hierarchy)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def subtree(mount: tuple[str, str], own: str) -> Path:
    """Our own cgroup's directory: the path is relative to the mount's root (cgroup namespaces)."""
    point, root = mount
    rel = own
    if root != "/" and (own == root or own.startswith(root.rstrip("/") + "/")):
        rel = own[len(root.rstrip("/")):]
    return Path(point) / rel.lstrip("/")


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


# -- effects ------------------------------------------------------------------------------


def _read(path: Path | str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def base_dir(controller_id: str) -> Path | None:
    """Where this controller's instance cgroups live, or None when cgroup v2 is not there."""
    if os.environ.get(SWITCH, "").lower() in ("off", "0", "false", "no"):
        return None
    mount = v2_mount(_read("/proc/self/mountinfo") or "")
    own = v2_path(_read("/proc/self/cgroup") or "")
    if mount is None or own is None:
        return None
    return subtree(mount, own) / f"{PREFIX}{safe(controller_id)}"


def procs(cgroup: Path | str) -> list[int]:
    text = _read(Path(cgroup) / "cgroup.procs")
    return [int(p) for p in text.split()] if text else []


def _live(pid: int) -> bool:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return False
    state = text.rsplit(")", 1)[-1].split()[:1]
    return bool(state) and state[0] not in ("Z", "X")


def live_pids(cgroup: Path | str) -> list[int]:
    """Processes in the cgroup that are not zombies (the kernel lists no zombie, but be sure)."""
    return [pid for pid in procs(cgroup) if _live(pid)]


def member_of(pid: int) -> str | None:
    """The unified-hierarchy path of pid's cgroup, as /proc shows it."""
    return v2_path(_read(f"/proc/{pid}/cgroup") or "")


def contains(cgroup: Path | str, pid: int) -> bool:
    return pid in procs(cgroup)


def signal(cgroup: Path | str, sig: int) -> None:
    """sig to every process of the cgroup; SIGKILL through cgroup.kill where the kernel has it,
    which also takes processes forked while we kill (a fork bomb cannot outrun it)."""
    path = Path(cgroup)
    if sig == signals.SIGKILL and _write(path / "cgroup.kill", "1"):
        return
    if sig == signals.SIGKILL:
        freeze_and_kill(path)
        return
    _signal_listed(path, sig)


def _signal_listed(path: Path, sig: int) -> bool:
    """sig to each process listed now; False when none was listed."""
    pids = procs(path)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return bool(pids)


def freeze_and_kill(path: Path) -> None:
    """Without cgroup.kill (kernel < 5.14): freeze the cgroup so nothing in it can fork, SIGKILL
    what is listed (a frozen process still dies of SIGKILL), thaw. Bounded rounds, no sleeping:
    the freeze is asked for and the kill follows; a fork that raced the freeze is caught by the
    next round."""
    frozen = _write(path / "cgroup.freeze", "1")
    try:
        for _ in range(KILL_ROUNDS):
            if not _signal_listed(path, signals.SIGKILL):
                return
    finally:
        if frozen:
            _write(path / "cgroup.freeze", "0")


def _write(path: Path, text: str) -> bool:
    try:
        with open(path, "w", encoding="ascii") as fh:
            fh.write(text)
    except OSError:
        return False
    return True


def memory_bytes(cgroup: Path | str) -> int | None:
    """The run's working set when the memory controller is enabled for our cgroups, else None:
    memory.current minus inactive file cache (as kubelet counts it), so a log the agent wrote,
    still cached, is not taken for memory it holds."""
    text = _read(Path(cgroup) / "memory.current")
    if not text or not text.strip().isdigit():
        return None
    inactive = 0
    for line in (_read(Path(cgroup) / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "inactive_file" and value.strip().isdigit():
            inactive = int(value)
    return max(0, int(text) - inactive)


def remove(cgroup: Path | str) -> bool:
    """rmdir an empty cgroup; one still in use (or already gone) is left as it is."""
    try:
        os.rmdir(cgroup)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def members(controller_id: str) -> list[Member]:
    """Every live process in an instance cgroup of this controller: found without reading any
    process's environment, so also after `env -i`, setsid, or for a non-dumpable process."""
    base = base_dir(controller_id)
    if base is None:
        return []
    found: list[Member] = []
    for leaf in _leaves(base):
        parsed = parse_leaf(leaf.name)
        if parsed is None:
            continue
        found.extend(Member(pid, *parsed, str(leaf)) for pid in live_pids(leaf))
    return found


def _leaves(base: Path) -> list[Path]:
    try:
        return sorted(p for p in base.iterdir() if p.is_dir())
    except OSError:
        return []


def prune(controller_id: str, *, keep: set[str], starting: set[str]) -> None:
    """Remove the empty instance cgroups of runs that are over: not in `keep` (live handles), and
    not of an instance in `starting` (its cgroup may wait, empty, for its process to join)."""
    base = base_dir(controller_id)
    if base is None:
        return
    for leaf in _leaves(base):
        parsed = parse_leaf(leaf.name)
        if parsed is not None and str(leaf) not in keep and parsed[0] not in starting and not procs(leaf):
            remove(leaf)


def _probe_join(base: Path) -> str | None:
    """Can a child of ours move itself into a cgroup here? (write access to our own cgroup's
    cgroup.procs is needed as well: the common ancestor of both). Tried once, for real."""
    probe = base / f"probe.{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        done = subprocess.run(join_argv(probe, ["true"]), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run {SH}: {exc}"
    finally:
        remove(probe)
    if done.returncode != 0:
        return f"a child cannot join a cgroup under {base}: {done.stderr.strip() or done.returncode}"
    return None


class Cgroups:
    """The adapters' handle on this controller's cgroup subtree; made once per adapter."""

    def __init__(self, controller_id: str) -> None:
        self.controller_id = controller_id
        self._base: Path | None = None
        self._problem: str | None = None
        self._checked = False

    def unavailable_reason(self) -> str | None:
        """None when instances can get their own cgroup here, else why not (checked once)."""
        if not self._checked:
            self._checked = True
            self._problem = self._check()
            if self._problem:
                log.info("no per-instance cgroups (%s): tracking by process group", self._problem)
            else:
                log.info("per-instance cgroups under %s", self._base)
        return self._problem

    def _check(self) -> str | None:
        base = base_dir(self.controller_id)
        if base is None:
            return f"cgroup v2 not mounted or {SWITCH}=off"
        try:
            base.mkdir(exist_ok=True)
        except OSError as exc:
            return f"cannot create {base}: {exc.strerror or exc}"
        if not os.access(base / "cgroup.procs", os.W_OK):
            return f"{base}/cgroup.procs is not writable"
        problem = _probe_join(base)
        if problem:
            return problem
        # memory.current per instance, where the parent offers the memory controller to us
        _write(base / "cgroup.subtree_control", "+memory")
        self._base = base
        return None

    def create(self, instance_id: str, run_id: str, spec_hash: str) -> Path | None:
        """A fresh, empty cgroup for one run of an instance, or None (then: process group)."""
        if self.unavailable_reason() is not None or self._base is None:
            return None
        path = self._base / leaf_name(instance_id, run_id, spec_hash)
        try:
            self._base.mkdir(exist_ok=True)  # removed by hand since the check: make it again
            path.mkdir(exist_ok=True)
        except OSError as exc:
            log.warning("%s: cannot create cgroup %s: %s", instance_id, path, exc.strerror or exc)
            return None
        return path
