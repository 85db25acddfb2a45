"""The manifests-source lock: real flock'd files in a temp lock directory.

flock locks belong to open file descriptions, so two acquisitions in one test process conflict
exactly as two controllers would; the two-controller case itself is in tests/e2e/test_store_faults.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from controller.sourcelock import SourceLocked, acquire, lock_dirs, source_keys


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    return tmp_path / "locks"


def test_a_second_holder_of_the_same_directory_is_refused_naming_the_first(tmp_path: Path, locks: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    first = acquire(source_keys(manifests, None), state_dir=tmp_path / "state-a", directory=locks)
    try:
        with pytest.raises(SourceLocked) as refused:
            acquire(source_keys(manifests, None), state_dir=tmp_path / "state-b", directory=locks)
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and str((tmp_path / "state-a").resolve()) in message
        assert str(manifests) in message
    finally:
        first.release()
    assert list(manifests.iterdir()) == [], "nothing is ever written into the manifests dir"


def test_the_lock_is_free_again_once_released_and_leaves_no_file(tmp_path: Path, locks: Path) -> None:
    keys = source_keys(tmp_path, None)
    acquire(keys, state_dir=tmp_path / "s", directory=locks).release()
    assert list(locks.iterdir()) == []
    again = acquire(keys, state_dir=tmp_path / "s", directory=locks)
    try:
        (held,) = list(locks.iterdir())
        assert json.loads(held.read_text())["pid"] == os.getpid()
    finally:
        again.release()


def test_a_symlink_to_the_directory_and_the_directory_are_the_same_source(tmp_path: Path, locks: Path) -> None:
    real = tmp_path / "releases" / "v1"
    real.mkdir(parents=True)
    link = tmp_path / "manifests"
    link.symlink_to(real)
    first = acquire(source_keys(real, None), state_dir=tmp_path / "a", directory=locks)
    try:
        with pytest.raises(SourceLocked):
            acquire(source_keys(link, None), state_dir=tmp_path / "b", directory=locks)
    finally:
        first.release()


def test_a_symlink_swapped_to_another_release_is_still_the_same_source(tmp_path: Path, locks: Path) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    link = tmp_path / "manifests"
    link.symlink_to(tmp_path / "v1")
    first = acquire(source_keys(link, None), state_dir=tmp_path / "a", directory=locks)
    try:
        link.unlink()
        link.symlink_to(tmp_path / "v2")  # a deploy swapped the release under the first controller
        with pytest.raises(SourceLocked):
            acquire(source_keys(link, None), state_dir=tmp_path / "b", directory=locks)
    finally:
        first.release()


def test_git_sources_are_keyed_by_url_and_path(tmp_path: Path, locks: Path) -> None:
    url = "https://example.invalid/agents.git"
    first = acquire(source_keys(None, (url, "/team-a/")), state_dir=tmp_path / "a", directory=locks)
    try:
        with pytest.raises(SourceLocked):
            acquire(source_keys(None, (url, "team-a")), state_dir=tmp_path / "b", directory=locks)
        other = acquire(source_keys(None, (url, "team-b")), state_dir=tmp_path / "c", directory=locks)
        other.release()
    finally:
        first.release()


def test_a_lock_directory_open_to_others_is_refused(tmp_path: Path, locks: Path) -> None:
    locks.mkdir(mode=0o700)
    os.chmod(locks, 0o777)
    with pytest.raises(SourceLocked, match="open to other users"):
        acquire(source_keys(tmp_path, None), state_dir=tmp_path / "s", directory=locks)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_lock_directory_owned_by_another_user_is_refused(tmp_path: Path, locks: Path) -> None:
    locks.mkdir(mode=0o700)
    os.chown(locks, 65534, 65534)
    with pytest.raises(SourceLocked, match="not a directory owned by uid"):
        acquire(source_keys(tmp_path, None), state_dir=tmp_path / "s", directory=locks)


def test_the_lock_directories_are_the_users_fixed_one_and_the_session_runtime_dir(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fixed = Path("/run/agentctl") if os.geteuid() == 0 else Path(f"/tmp/agentctl-{os.geteuid()}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert lock_dirs() == [tmp_path / "agentctl", fixed]  # a login shell and a unit see each other in `fixed`
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert lock_dirs() == [fixed]


def test_controllers_acting_as_different_hosts_of_a_fleet_may_share_a_source(tmp_path: Path, locks: Path) -> None:
    url = "https://example.invalid/agents.git"
    gpu1 = acquire(source_keys(None, (url, "agents"), host="gpu-1"), state_dir=tmp_path / "a", directory=locks)
    try:
        acquire(source_keys(None, (url, "agents"), host="gpu-2"), state_dir=tmp_path / "b", directory=locks).release()
        with pytest.raises(SourceLocked, match="for host gpu-1"):
            acquire(source_keys(None, (url, "agents"), host="gpu-1"), state_dir=tmp_path / "c", directory=locks)
    finally:
        gpu1.release()


def test_lock_files_left_by_killed_controllers_are_swept_and_live_ones_kept(tmp_path: Path, locks: Path) -> None:
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    live = acquire(source_keys(live_dir, None), state_dir=tmp_path / "a", directory=locks)
    try:
        stale = locks / ("0" * 32 + ".lock")
        stale.write_text('{"pid": 1, "stateDir": "/nowhere"}\n')  # its controller was SIGKILLed
        other = acquire(source_keys(tmp_path / "elsewhere", None), state_dir=tmp_path / "b", directory=locks)
        other.release()
        assert not stale.exists()
        assert [p for p in locks.iterdir()] == [live.held[0][0]]
        with pytest.raises(SourceLocked):
            acquire(source_keys(live_dir, None), state_dir=tmp_path / "c", directory=locks)
    finally:
        live.release()
