"""Reading /proc: process start ticks, process-group members, whole-tree memory and CPU.

Effects layer (reads the OS). One directory pass serves every question asked in the
same round, so callers batch: `snapshot()` once, then look up many groups and trees.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from controller import cgroups

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Stat(NamedTuple):
    """One /proc/PID/stat, the fields we use (a tuple: a /proc pass builds one per host process,
    and a frozen dataclass costs several times as much to construct)."""

    pid: int
    state: str
    ppid: int
    pgid: int
    utime: int
    stime: int
    start_ticks: int
    rss_pages: int


def read_stat(pid: int) -> Stat | None:
    # os.open/os.read rather than open(): no file object per read, which a pass over /proc
    # with a thousand processes pays a thousand times. A stat line is a few hundred bytes.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # comm may hold spaces and parentheses: split after the last ')'
    rest = raw[raw.rfind(b")") + 2 :].split()
    if len(rest) < 22:
        return None  # gone between open and read
    return Stat(pid, rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[11]), int(rest[12]), int(rest[19]),
                int(rest[21]))


def zombie_status(pid: int, ticks: int) -> tuple[int | None, int | None] | None:
    """(exit code, signal) of a zombie not reaped yet, from /proc/<pid>/stat field 52 (the wait
    status, Linux >= 3.5); None unless pid is that process (same start ticks) and a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            rest = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if len(rest) < 50 or rest[0] != b"Z" or int(rest[19]) != ticks:
        return None
    status = int(rest[49])
    if status & 0x7F == 0:
        return (status >> 8) & 0xFF, None
    return None, status & 0x7F


def start_ticks(pid: int) -> int | None:
    stat = read_stat(pid)
    return stat.start_ticks if stat else None


def is_live(pid: int, ticks: int) -> bool:
    """The same process (pid and start time) exists and is not a zombie."""
    stat = read_stat(pid)
    return stat is not None and stat.start_ticks == ticks and stat.state not in ("Z", "X")


def boot_id() -> str:
    """Changes at every boot: pids and start ticks of an earlier boot name nothing now."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def group_exists(pgid: int) -> bool:
    """Cheap first check: kill(-pgid, 0) fails once no process (not even a zombie) is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Snapshot:
    """One pass over /proc: every live (non-zombie) process, by pgid and by parent."""

    stats: dict[int, Stat] = field(default_factory=dict)
    by_pgid: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    children: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))

    def group(self, pgid: int) -> list[int]:
        return list(self.by_pgid.get(pgid, ()))

    def tree(self, root: int) -> list[int]:
        """root and all its live descendants."""
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            if pid in self.stats:
                out.append(pid)
                todo.extend(self.children.get(pid, ()))
        return out

    def instance_pids(self, pid: int, pgid: int, cgroup: str = "") -> set[int]:
        """Every process of an instance: its process group plus the leader's descendants, plus
        (with a cgroup) every live member of its cgroup, setsid escapees included."""
        pids = set(self.group(pgid)) | set(self.tree(pid))
        if cgroup:
            pids |= {p for p in cgroup_pids(cgroup) if p in self.stats}
        return pids

    def usage(self, pids: set[int]) -> tuple[int, float]:
        """(resident bytes, cpu seconds) summed over pids."""
        rss = sum(self.stats[p].rss_pages for p in pids if p in self.stats) * PAGE_SIZE
        ticks = sum(self.stats[p].utime + self.stats[p].stime for p in pids if p in self.stats)
        return rss, ticks / CLK_TCK


def cgroup_pids(cgroup: str) -> list[int]:
    """cgroups.procs read with os.read: a scrape reads one cgroup.procs per instance, and a
    file object per read costs more than the read itself (22 -> 9 ms for 1000 instances)."""
    try:
        fd = os.open(f"{cgroup}/cgroup.procs", os.O_RDONLY)
    except OSError:
        return []
    chunks: list[bytes] = []
    try:
        for _ in range(1 << 16):  # bounded: each round reads 64 KiB, far more than any cgroup lists
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return []
    finally:
        os.close(fd)
    return [int(p) for p in b"".join(chunks).split()]


def snapshot() -> Snapshot:
    snap = Snapshot()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = read_stat(int(name))
        if stat is None or stat.state in ("Z", "X"):
            continue
        snap.stats[stat.pid] = stat
        snap.by_pgid[stat.pgid].append(stat.pid)
        snap.children[stat.ppid].append(stat.pid)
    return snap


def pss_bytes(pid: int) -> int | None:
    """Proportional set size (/proc/PID/smaps_rollup): shared pages split among their users.
    None when it cannot be read (gone, kernel before 4.14, not allowed)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def tree_memory(snap: Snapshot, pids: set[int], *, limit: int = 0) -> int:
    """What an instance costs the host: PSS summed over its processes, so that a binary shared by
    many agents (claude's 200 MB executable) is not counted once per agent as RSS would; a
    process whose PSS cannot be read counts with its RSS. PSS <= RSS, so while the cheap RSS
    sum is at most `limit` it is returned instead: smaps_rollup walks page tables (~7 ms for a
    300 MiB process on a busy box) and is read only for a tree that might be over its limit."""
    rss, _ = snap.usage(pids)
    if rss <= limit:
        return rss
    total = 0
    for pid in pids:
        if pid not in snap.stats:
            continue
        pss = pss_bytes(pid)
        total += pss if pss is not None else snap.stats[pid].rss_pages * PAGE_SIZE
    return total


def live_group_members(pgid: int) -> list[int]:
    """Non-zombie processes of a group; an empty list means the group is gone."""
    if not group_exists(pgid):
        return []
    return snapshot().group(pgid)


def read_environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


@dataclass(frozen=True)
class Marked:
    """A live process that carries a controller's marker env."""

    pid: int
    stat: Stat
    instance: str
    agent: str
    spec_hash: str
    run: str = ""
    cgroup: str = ""  # the instance cgroup it was found in, if any


def marked_processes(controller_id: str) -> list[Marked]:
    """Every live process started (directly or not) by instances of this controller: those in
    its instance cgroups (found without reading environ: `env -i`, non-dumpable) and those that
    carry its marker env. What a cgroup says wins over what a process's own env claims."""
    found = {m.pid: m for m in _by_marker(controller_id)}
    for member in cgroups.members(controller_id):
        stat = read_stat(member.pid)
        if stat is None or stat.state in ("Z", "X"):
            continue
        agent = member.instance.rsplit("-", 1)[0]
        found[member.pid] = Marked(member.pid, stat, member.instance, agent, member.spec_hash, member.run,
                                   member.cgroup)
    return list(found.values())


def _by_marker(controller_id: str) -> list[Marked]:
    needle = f"AGENTCTL_CONTROLLER_ID={controller_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        if needle not in raw:
            continue
        env = dict(item.partition(b"=")[::2] for item in raw.split(b"\0") if b"=" in item)
        if env.get(b"AGENTCTL_CONTROLLER_ID") != controller_id.encode():
            continue
        stat = read_stat(int(name))
        if stat is None or stat.state in ("Z", "X"):
            continue
        found.append(Marked(int(name), stat, env.get(b"AGENTCTL_INSTANCE", b"").decode(errors="replace"),
                            env.get(b"AGENTCTL_AGENT", b"").decode(errors="replace"),
                            env.get(b"AGENTCTL_SPEC_HASH", b"").decode(errors="replace"),
                            env.get(b"AGENTCTL_RUN", b"").decode(errors="replace")))
    return found


def cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    return tuple(part.decode(errors="surrogateescape") for part in raw.split(b"\0")[:-1])


def descends_from(pid: int, ancestor: int, max_depth: int = 64) -> bool:
    for _ in range(max_depth):
        stat = read_stat(pid)
        if stat is None or stat.ppid <= 1:
            return False
        if stat.ppid == ancestor:
            return True
        pid = stat.ppid
    return False


def parent_is_tmux(stat: Stat) -> bool:
    try:
        with open(f"/proc/{stat.ppid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().startswith("tmux")
    except OSError:
        return False
