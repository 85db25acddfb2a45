"""controller.inotify on a real directory: what the manifests watch relies on.

A file written in a subdirectory created after the watch began is reported (the new
directory gets its own watch), and the burst ends by itself, with no thread stepping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from controller import inotify


async def _next_burst(ino: inotify.Inotify, stop: asyncio.Event) -> list[inotify.Event]:
    async for events in inotify.bursts(ino, stop, debounce=0.05):
        return events
    return []


def _collect_until(ino: inotify.Inotify, want: Path, act: list[Callable[[], object]]) -> set[Path]:
    async def main() -> set[Path]:
        stop = asyncio.Event()
        seen: set[Path] = set()
        loop = asyncio.get_running_loop()
        for step in act:
            loop.call_soon(step)
        deadline = loop.time() + 20
        while want not in seen and loop.time() < deadline:
            events = await asyncio.wait_for(_next_burst(ino, stop), max(0.1, deadline - loop.time()))
            for e in events:
                if e.mask & inotify.IN_ISDIR and e.mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
                    ino.add_tree(e.path)  # what watch.py does for a new directory
            seen |= {e.path for e in events}
        return seen

    return asyncio.run(main())


def test_a_file_in_a_directory_created_after_the_watch_is_reported(tmp_path: Path) -> None:
    ino = inotify.Inotify()
    try:
        ino.add_tree(tmp_path)
        sub = tmp_path / "team"
        seen = _collect_until(ino, sub, [sub.mkdir])
        assert sub in seen
        target = sub / "a.yaml"
        seen = _collect_until(ino, target, [lambda: target.write_text("x: 1\n")])
        assert target in seen
    finally:
        ino.close()


def test_a_removed_root_drops_its_watch(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    ino = inotify.Inotify()
    try:
        ino.add_tree(root)
        seen = _collect_until(ino, root, [root.rmdir])
        assert root in seen
        assert root not in ino.dirs.values()  # watch.py re-aims when its root's watch is gone
    finally:
        ino.close()


def test_a_path_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    ino = inotify.Inotify()
    try:
        with pytest.raises(OSError):
            ino.add(f, inotify.TREE)  # watch.py then falls back to watchfiles, which reports it
    finally:
        ino.close()


class _Flag:
    """What watch.py's tree watch touches on a controller: a dirty flag and a wake-up."""

    def __init__(self) -> None:
        self.manifests_changed = False

    def wake(self) -> None:
        pass


@pytest.mark.parametrize("have_inotify", [True, False])
def test_an_edit_is_seen_with_inotify_and_with_the_watchfiles_fallback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, have_inotify: bool) -> None:
    from controller import watch

    if not have_inotify:
        def refuse() -> inotify.Inotify:
            raise OSError("no inotify here")
        monkeypatch.setattr(watch.inotify, "Inotify", refuse)
    root = tmp_path / "m"
    root.mkdir()
    flag = _Flag()

    async def main() -> bool:
        stop, replaced = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(watch._watch_tree(flag, root, replaced, stop))  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        try:
            # the watch may not be in place yet when the first write lands: write again each
            # 0.2 s until one is seen (bounded by the deadline)
            deadline = loop.time() + 20
            n = 0
            while not flag.manifests_changed and loop.time() < deadline:
                n += 1
                (root / "a.yaml").write_text(f"x: {n}\n")
                for _ in range(10):
                    if flag.manifests_changed:
                        break
                    await asyncio.sleep(0.02)
            return flag.manifests_changed
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    assert asyncio.run(main())


def test_a_burst_waits_for_a_file_being_written_to_be_closed(tmp_path: Path) -> None:
    """A writer that pauses between two chunks: the burst must not end (and the manifest be
    read half-written) before the file is closed, within the debounce ceiling."""
    ino = inotify.Inotify()
    target = tmp_path / "a.yaml"
    fh = None
    try:
        ino.add_tree(tmp_path)

        async def main() -> list[inotify.Event]:
            nonlocal fh
            loop = asyncio.get_running_loop()
            fh = open(target, "w")

            def rest() -> None:
                assert fh is not None
                fh.write("command: [sleep, '1']\n")
                fh.close()

            fh.write("name: a\n")
            fh.flush()
            loop.call_later(0.02, rest)  # the second chunk comes after more than QUIET
            return await asyncio.wait_for(_next_burst(ino, asyncio.Event()), 20)

        events = asyncio.run(main())
        assert any(e.path == target and e.mask & inotify.IN_CLOSE_WRITE for e in events)
    finally:
        if fh is not None:
            fh.close()
        ino.close()
