"""`agentctl drain HOST` / `agentctl uncordon HOST`: talk to etcd directly (CONTRACT §10).

Entry layer helpers, called by cli. A drain is a key without a lease under
/agentctl/<fleet>/drained/: the leader reassigns the host's instances (each stopped there
before it starts elsewhere, by the ownership claims) and gives it none until uncordon.
"""

from __future__ import annotations

from controller.fleet.kv import Delete, KVError, Put
from controller.fleet.records import Keys, decode_host
from controller.fleet.timing import Timing
from controller.fleet.wiring import make_kv
from controller.settings import Coordination


def drain(cfg: Coordination, host: str, *, on: bool) -> tuple[int, str]:
    """(exit code, message) for drain (on) or uncordon (off)."""
    kv = make_kv(cfg, max(2.0, Timing(cfg.lease_ttl).request_timeout))
    keys = Keys(cfg.fleet)
    try:
        _, entries = kv.range(keys.hosts)
        known = {r.name for r in (decode_host(e.value) for e in entries) if r is not None}
        kv.txn([], [Put(keys.drain(host), b"drained") if on else Delete(keys.drain(host))])
    except KVError as exc:
        return 1, f"error: {exc}"
    what = "drained: its instances move to other hosts, and it gets no new ones" if on else "uncordoned"
    note = "" if host in known else f" (no live host named {host} in fleet {cfg.fleet} right now)"
    return 0, f"host {host} {what}{note}"
