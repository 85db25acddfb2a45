"""The registry of supervisor adapters: a manifest's `spec.supervisor` value -> its adapter class.

Model layer, pure data: `manifests` validates `spec.supervisor` against these names and
`supervisors.registry` imports the classes when the controller starts. Adding a supervisor is
one module under controller/supervisors/ and one line here; nothing else branches on the kind.
"""

from __future__ import annotations

SUPERVISORS: dict[str, str] = {
    "process": "controller.supervisors.process:ProcessSupervisor",
    "tmux": "controller.supervisors.tmux:TmuxSupervisor",
    "systemd": "controller.supervisors.systemd:SystemdSupervisor",
}
