"""The one place that knows every adapter: `spec.supervisor` value -> adapter class.

Adding an adapter means one module and one entry here; nothing else branches on the kind.
"""

from __future__ import annotations

from controller.supervisors.base import Context, Supervisor
from controller.supervisors.process import ProcessSupervisor
from controller.supervisors.systemd import SystemdSupervisor
from controller.supervisors.tmux import TmuxSupervisor

ADAPTERS: dict[str, type] = {
    "process": ProcessSupervisor,
    "tmux": TmuxSupervisor,
    "systemd": SystemdSupervisor,
}


def build(ctx: Context) -> dict[str, Supervisor]:
    return {kind: cls(ctx) for kind, cls in ADAPTERS.items()}
