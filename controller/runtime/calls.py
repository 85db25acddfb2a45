"""How the runtime calls a supervisor: on the loop thread, or in a worker thread when the
adapter runs external commands (tmux, systemctl). One seam, so the simulation can interleave.

Runtime layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from controller.supervisors.base import Supervisor

T = TypeVar("T")


class Caller(Protocol):
    async def __call__(self, sup: Supervisor, fn: Callable[..., T], *args: Any) -> T: ...


async def call(sup: Supervisor, fn: Callable[..., T], *args: Any) -> T:
    if sup.blocking:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
