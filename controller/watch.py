"""Wake-ups for the reconcile loop: manifest file events, restart requests, periodic resync.

Runtime layer. Each source only marks the controller dirty and wakes it; the loop does
the work. Files are watched with inotify on the event loop (controller/inotify.py: nothing
wakes while idle), or with watchfiles where inotify cannot be used. The manifests dir is
watched from its parent too, so a rename, symlink swap or re-creation of the dir re-aims
the recursive watch instead of losing it (CONTRACT §11).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from controller import inotify, opsrequests
from controller.gitsource import SyncResult, fetch_error
from controller.loader import is_ignored
from controller.reconciler import Controller

if TYPE_CHECKING:
    import watchfiles

log = logging.getLogger("agentctl.watch")
DEBOUNCE_MS = 50  # most a burst of events is held together
RETRY_MIN, RETRY_MAX = 0.02, 1.0  # seconds before watching again after a watch broke (doubling)
STEP_MS = 20  # quiet time that ends a burst; also how often the watcher thread wakes (idle CPU)
ENTRIES_STEP_MS = 100  # the parent dir and restart requests: a swap is rare, a request is not urgent


Keep = Callable[[str], bool]  # which changed paths matter
# events that need a walk of the tree: a directory's, or the watched root's own
_WALK = inotify.IN_ISDIR | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_IGNORED


def _relevant(root: Path) -> Keep:
    def keep(path: str) -> bool:
        try:
            rel = Path(path).relative_to(root)
        except ValueError:
            return True
        return rel == Path(".") or not is_ignored(rel)

    return keep


def _entries(given: Path, requests: Path) -> Keep:
    """Events of the parent dir about the manifests dir's own entry, and restart requests."""
    def keep(path: str) -> bool:
        p = Path(path)
        if p.parent == requests:  # restart, and suspend/resume/reconcile (opscli)
            return p.suffix == ".restart" or p.suffix in opsrequests.SUFFIXES
        return p == given

    return keep


def _filter(keep: Keep) -> watchfiles.BaseFilter:
    # watchfiles (and anyio under it) is imported only where inotify cannot be used: about
    # 1.7 MiB of RSS that an idle controller does not need
    import watchfiles

    class Filter(watchfiles.BaseFilter):
        def __call__(self, change: watchfiles.Change, path: str) -> bool:
            return keep(path)

    return Filter()


def _awatch(*paths: Path, keep: Keep, step: int, stop_event: _Either,
            recursive: bool) -> AsyncIterator[set[tuple[watchfiles.Change, str]]]:
    import watchfiles

    return watchfiles.awatch(
        *paths, watch_filter=_filter(keep), debounce=DEBOUNCE_MS, step=step,
        stop_event=stop_event,  # type: ignore[arg-type]  # only is_set() and set() are used
        recursive=recursive, ignore_permission_denied=True,
    )


class _Either:
    """A stop event for one watch: the controller stops, or the watched directory was replaced.
    watchfiles sets it when its task is cancelled, which must not stop the controller."""

    def __init__(self, *events: asyncio.Event) -> None:
        self.events = events
        self._set = False

    def is_set(self) -> bool:
        return self._set or any(e.is_set() for e in self.events)

    def set(self) -> None:
        self._set = True


def consume_requests(controller: Controller, requests: Path) -> None:
    """`agentctl restart NAME` drops NAME.restart here; it is removed once acted on."""
    for path in sorted(requests.glob("*.restart")):
        name = path.stem
        if controller.manual_restart(name, fresh=_wants_fresh(path)):  # presets: restart --fresh
            log.info("%s restart requested", name)
        else:
            log.warning("restart requested for unknown agent %s", name)
        path.unlink(missing_ok=True)
    opsrequests.consume(controller, requests)  # opscli: suspend, resume, reconcile


def _manifests_changed(controller: Controller) -> None:
    controller.manifests_changed = True
    controller.wake()


async def _pause(stop: asyncio.Event, *others: asyncio.Event, seconds: float = 1.0) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in (stop, *others)]
    await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()


async def _watch_entries(controller: Controller, given: Path | None, requests: Path, replaced: asyncio.Event,
                         stop: asyncio.Event) -> None:
    """Non-recursive: the manifests dir's parent (a rename, symlink swap, deletion or re-creation
    of the dir is an event there, never inside it) and the restart requests dir."""
    paths = [requests] + ([given.parent] if given is not None else [])
    while not stop.is_set():
        ino = _open(paths, tree=False)
        if ino is not None:  # idle CPU: no thread stepping while nothing changes
            try:
                keep = _entries(given or requests, requests)
                async for events in inotify.bursts(ino, stop, debounce=DEBOUNCE_MS / 1000):
                    _on_entries(controller, given, requests, replaced,
                                {str(e.path) for e in events if keep(str(e.path))} | _overflow(ino, paths))
            except Exception as exc:  # noqa: BLE001 - a watch that breaks is started again, never lost
                log.error("watch of %s failed (%r); retrying in 1s", ", ".join(map(str, paths)), exc)
                await _pause(stop)
            finally:
                ino.close()
            continue
        try:
            # cancelling a watch must not stop the controller: its own stop event
            async for changes in _awatch(*paths, keep=_entries(given or requests, requests), step=ENTRIES_STEP_MS,
                                         stop_event=_Either(stop), recursive=False):
                _on_entries(controller, given, requests, replaced, {p for _, p in changes})
        except Exception as exc:  # noqa: BLE001 - a watch that breaks is started again, never lost
            log.error("watch of %s failed (%r); retrying in 1s", ", ".join(map(str, paths)), exc)
            await _pause(stop)


def _on_entries(controller: Controller, given: Path | None, requests: Path, replaced: asyncio.Event,
                changes: set[str]) -> None:
    if any(Path(p) == given for p in changes):
        log.info("manifests dir %s was replaced, moved or removed: watching it anew", given)
        replaced.set()
        _manifests_changed(controller)
    if any(Path(p).parent == requests for p in changes):
        consume_requests(controller, requests)


def _overflow(ino: inotify.Inotify, paths: list[Path]) -> set[str]:
    """Events were lost: act as if each watched entry had changed (reading again is harmless)."""
    if not ino.overflowed:
        return set()
    ino.overflowed = False
    return {str(p) for p in paths}


def _open(paths: list[Path], *, tree: bool) -> inotify.Inotify | None:
    """An inotify watch of paths, or None to use watchfiles (no inotify, out of watches or
    instances, or a path that cannot be watched: watchfiles then reports it as before)."""
    try:
        ino = inotify.Inotify()
    except OSError as exc:
        log.debug("inotify unavailable (%s): watching with watchfiles", exc)
        return None
    try:
        for p in paths:
            if tree:
                ino.add_tree(p)
            else:
                ino.add(p, inotify.ENTRIES)
    except OSError as exc:
        log.debug("cannot watch %s with inotify (%s): watching with watchfiles", paths, exc)
        ino.close()
        return None
    return ino


async def _tree_events(controller: Controller, given: Path, target: Path, ino: inotify.Inotify,
                       replaced: asyncio.Event, stop: asyncio.Event) -> None:
    """The inotify watch of target until it is replaced or the controller stops."""
    keep = _relevant(target)
    async for events in inotify.bursts(ino, stop, replaced, debounce=DEBOUNCE_MS / 1000):
        for e in events:  # a directory created or moved in: watch it (and what it already holds)
            if e.mask & inotify.IN_ISDIR and e.mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
                try:
                    ino.add_tree(e.path)
                except (FileNotFoundError, NotADirectoryError, PermissionError):
                    pass
        lost = ino.overflowed
        if lost:
            ino.overflowed = False
            ino.add_tree(target)  # directories created while events were lost get their watch
        files = {str(e.path) for e in events if keep(str(e.path))}
        if lost or any(e.mask & _WALK for e in events):
            _manifests_changed(controller)
        elif files:  # files only: the controller re-reads just these, no walk of the tree
            controller.manifests_touched(files)
        if target not in ino.dirs.values() or given.resolve() != target or not target.is_dir():
            replaced.set()  # the swap itself was seen from inside: re-aim now


async def _watch_tree(controller: Controller, given: Path, replaced: asyncio.Event, stop: asyncio.Event) -> None:
    """Recursive watch of the directory the manifests path resolves to now; started again on the
    directory that path names after a swap (the old watch would follow the old inode)."""
    pause = RETRY_MIN
    while not stop.is_set():
        replaced.clear()
        target = given.resolve()
        if not target.is_dir():
            await _pause(stop, replaced)  # absent for now: the parent watch says when it is back
            _manifests_changed(controller)
            continue
        began = time.monotonic()
        ino = _open([target], tree=True)
        try:
            if ino is not None:  # idle CPU: nothing wakes until the kernel has an event
                await _tree_events(controller, given, target, ino, replaced, stop)
            else:
                await _watchfiles_tree(controller, given, target, replaced, stop)
        except Exception as exc:  # noqa: BLE001 - a watch that breaks is started again, never lost
            # e.g. an event on a file name that is not UTF-8 (watchfiles cannot decode it): something
            # changed, so read now, and watch again at once unless it keeps failing
            _manifests_changed(controller)
            pause = RETRY_MIN if time.monotonic() - began > RETRY_MAX else min(pause * 2, RETRY_MAX)
            log.warning("file watch of %s interrupted (%r); watching again in %.2fs", target, exc, pause)
            await _pause(stop, replaced, seconds=pause)
        finally:
            if ino is not None:
                ino.close()
        _manifests_changed(controller)  # whatever happened while re-aiming is read once more


async def _watchfiles_tree(controller: Controller, given: Path, target: Path, replaced: asyncio.Event,
                           stop: asyncio.Event) -> None:
    """Where inotify cannot be used: watchfiles, whose thread wakes every STEP_MS."""
    async for _ in _awatch(target, keep=_relevant(target), step=STEP_MS, stop_event=_Either(stop, replaced),
                           recursive=True):
        _manifests_changed(controller)
        if given.resolve() != target or not target.is_dir():
            replaced.set()  # the swap itself was seen from inside: re-aim now


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
    given = None if controller.git is not None else controller.settings.manifests.absolute()
    requests = (controller.state_dir / "requests").resolve()
    consume_requests(controller, requests)
    replaced = asyncio.Event()
    tasks = [asyncio.ensure_future(_watch_entries(controller, given, requests, replaced, stop))]
    if given is not None:
        tasks.append(asyncio.ensure_future(_watch_tree(controller, given, replaced, stop)))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def git_poller(controller: Controller, stop: asyncio.Event, interval: float) -> None:
    """Fetch on a timer; a new revision is loaded like a burst of file events."""
    git = controller.git
    assert git is not None
    while not stop.is_set():
        before = git.last_error
        try:
            result = await asyncio.to_thread(git.sync)
        except Exception as exc:  # noqa: BLE001 - polling must outlive any one failure (CONTRACT §11)
            git.last_error = f"git sync failed: {exc!r}"
            result = SyncResult(git.revision, False, git.last_error)
        if result.error and result.error != before:
            log.error("%s; keeping revision %s", fetch_error(git.url, result.error), result.revision)  # opscli
        if result.changed:
            controller.manifests_changed = True
        if result.changed or result.error != before:
            controller.resync()  # SourceReady and sourceRevision change on every status
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


SOURCE_RETRY = 1.0  # while part of the manifest source cannot be read, read it again this often


async def resync_ticker(controller: Controller, stop: asyncio.Event, period: float) -> None:
    """The periodic resync; while a read of the source fails, also a re-read every SOURCE_RETRY
    seconds, so the problem clears (and a vanished file is deleted) without waiting a period.
    With every part readable it sleeps until the resync is due: a failure that begins wakes it."""
    loop = asyncio.get_running_loop()
    failing = asyncio.Event()

    def began() -> None:  # may be called off the loop thread (a load in a worker)
        loop.call_soon_threadsafe(failing.set)

    health = controller.source_health
    health.on_failing.append(began)
    next_resync = time.monotonic() + period
    try:
        while not stop.is_set():
            failing.clear()
            due = next_resync - time.monotonic()
            if controller.source_health.failures:
                await _pause(stop, seconds=max(0.0, min(SOURCE_RETRY, due)))
            else:
                await _pause(stop, failing, seconds=max(0.0, due))
                if failing.is_set():
                    await _pause(stop, seconds=max(0.0, min(SOURCE_RETRY, next_resync - time.monotonic())))
            if stop.is_set():
                return
            try:
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + period
                    controller.resync()
                elif controller.source_health.failures:
                    _manifests_changed(controller)
            except Exception as exc:  # noqa: BLE001 - the resync must outlive any one failure
                log.error("resync failed: %r", exc)
    finally:
        health.on_failing.remove(began)
