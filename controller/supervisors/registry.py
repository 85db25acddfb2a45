"""Builds the adapters named in controller.plugins, one instance per kind.

Adding an adapter means one module and one entry in controller/plugins.py; nothing else
branches on the kind.
"""

from __future__ import annotations

import importlib

from controller.plugins import SUPERVISORS
from controller.supervisors.base import Context, Supervisor


def adapter_class(kind: str) -> type:
    module, _, name = SUPERVISORS[kind].partition(":")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


def adapter(kind: str, ctx: Context) -> Supervisor | None:
    """One adapter by its manifest name (None for a name no longer in the registry)."""
    if kind not in SUPERVISORS:
        return None
    sup: Supervisor = adapter_class(kind)(ctx)
    return sup


def build(ctx: Context) -> dict[str, Supervisor]:
    return {kind: adapter_class(kind)(ctx) for kind in SUPERVISORS}
