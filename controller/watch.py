"""Wake-ups for the reconcile loop: manifest file events, restart requests, periodic resync.

Runtime layer. Each source only marks the controller dirty and wakes it; the loop does
the work. watchfiles' debounce is set to tens of milliseconds (its default is 1.6 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

import watchfiles

from controller.loader import is_ignored
from controller.reconciler import Controller

log = logging.getLogger("agentctl.watch")
DEBOUNCE_MS = 50  # most a burst of events is held together
STEP_MS = 20  # quiet time that ends a burst; also how often the watcher thread wakes (idle CPU)


def _relevant(root: Path, requests: Path) -> watchfiles.BaseFilter:
    class Filter(watchfiles.BaseFilter):
        def __call__(self, change: watchfiles.Change, path: str) -> bool:
            p = Path(path)
            if p.parent == requests:
                return p.suffix == ".restart"
            try:
                rel = p.relative_to(root)
            except ValueError:
                return True  # the root itself (moved, deleted)
            return not is_ignored(rel)

    return Filter()


def consume_requests(controller: Controller, requests: Path) -> None:
    """`agentctl restart NAME` drops NAME.restart here; it is removed once acted on."""
    for path in sorted(requests.glob("*.restart")):
        name = path.stem
        if controller.manual_restart(name, fresh=_wants_fresh(path)):  # presets: restart --fresh
            log.info("%s restart requested", name)
        else:
            log.warning("restart requested for unknown agent %s", name)
        path.unlink(missing_ok=True)


def _wants_fresh(path: Path) -> bool:
    """presets: `restart --fresh` writes the word `fresh` in its request. Read without blocking
    and only from a regular file (a FIFO planted there must not hang the loop)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and b"fresh" in os.read(fd, 256).split()
    except OSError:
        return False
    finally:
        os.close(fd)


async def watch_files(controller: Controller, stop: asyncio.Event) -> None:
    """Manifest dir events (directory sources only) and restart requests."""
    root = controller.settings.manifests.resolve()
    requests = (controller.state_dir / "requests").resolve()
    paths = [requests] if controller.git is not None else [root, requests]
    consume_requests(controller, requests)
    while not stop.is_set():
        try:
            async for changes in watchfiles.awatch(
                *paths, watch_filter=_relevant(root, requests), debounce=DEBOUNCE_MS, step=STEP_MS,
                stop_event=stop, recursive=True, ignore_permission_denied=True,
            ):
                if any(Path(p).parent != requests for _, p in changes):
                    controller.manifests_changed = True
                    controller.wake()
                if any(Path(p).parent == requests for _, p in changes):
                    consume_requests(controller, requests)
        except (OSError, RuntimeError) as exc:
            # the directory vanished or the watcher broke: resync keeps working, retry the watch
            log.error("file watch failed (%s); retrying in 1s", exc)
            controller.manifests_changed = True
            controller.wake()
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def git_poller(controller: Controller, stop: asyncio.Event, interval: float) -> None:
    """Fetch on a timer; a new revision is loaded like a burst of file events."""
    git = controller.git
    assert git is not None
    while not stop.is_set():
        before = git.last_error
        result = await asyncio.to_thread(git.sync)
        if result.error and result.error != before:
            log.error("git fetch of %s failed, keeping revision %s: %s", git.url, result.revision, result.error)
        if result.changed:
            controller.manifests_changed = True
        if result.changed or result.error != before:
            controller.resync()  # SourceReady and sourceRevision change on every status
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


async def resync_ticker(controller: Controller, stop: asyncio.Event, period: float) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), period)
        except TimeoutError:
            controller.resync()
