"""cgroup v2 discovery and naming on recorded /proc samples (no cgroup is touched here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import cgroups

HYBRID = """\
25 31 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
"""
UNIFIED = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"
NAMESPACED = "30 24 0:26 /kubepods/pod1 /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"


def test_the_unified_mount_is_found_in_a_hybrid_layout() -> None:
    assert cgroups.v2_mount(HYBRID) == ("/sys/fs/cgroup/unified", "/")
    assert cgroups.v2_mount(UNIFIED) == ("/sys/fs/cgroup", "/")
    assert cgroups.v2_mount("") is None


def test_own_cgroup_is_the_zero_line() -> None:
    text = "12:memory:/user.slice\n0::/system.slice/agentctl.service\n"
    assert cgroups.v2_path(text) == "/system.slice/agentctl.service"
    assert cgroups.v2_path("4:memory:/x\n") is None


@pytest.mark.parametrize(
    ("mount", "own", "expected"),
    [
        (("/sys/fs/cgroup", "/"), "/system.slice/agentctl.service", "/sys/fs/cgroup/system.slice/agentctl.service"),
        (("/sys/fs/cgroup/unified", "/"), "/", "/sys/fs/cgroup/unified"),
        (("/sys/fs/cgroup", "/kubepods/pod1"), "/kubepods/pod1/c1", "/sys/fs/cgroup/c1"),
    ],
)
def test_subtree_is_our_own_cgroup_directory(mount: tuple[str, str], own: str, expected: str) -> None:
    assert cgroups.subtree(mount, own) == Path(expected)


def test_mountinfo_escapes_are_undone() -> None:
    assert cgroups.unescape("/mnt/with\\040space") == "/mnt/with space"


def test_leaf_names_carry_instance_run_and_spec_hash() -> None:
    name = cgroups.leaf_name("reviewer-0", "0a1b2c", "sha256:ff00")
    assert "/" not in name and ":" not in name
    assert cgroups.parse_leaf(name) == ("reviewer-0", "0a1b2c", "sha256:ff00")


@pytest.mark.parametrize("name", ["cgroup.procs", "other", "Reviewer-0.ab.h", "x.zz.h"])
def test_names_we_did_not_make_are_not_parsed(name: str) -> None:
    assert cgroups.parse_leaf(name) is None


def test_switch_off_disables_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cgroups.SWITCH, "off")
    assert cgroups.base_dir("c1") is None
    assert cgroups.Cgroups("c1").create("a-0", "ab", "h") is None
    assert cgroups.members("c1") == []


def test_memory_is_the_working_set_without_inactive_file_cache(tmp_path: Path) -> None:
    (tmp_path / "memory.current").write_text("104857600\n")
    (tmp_path / "memory.stat").write_text("anon 52428800\nfile 52428800\ninactive_file 41943040\n")
    assert cgroups.memory_bytes(tmp_path) == 104857600 - 41943040


def test_no_memory_controller_means_no_figure(tmp_path: Path) -> None:
    assert cgroups.memory_bytes(tmp_path) is None
