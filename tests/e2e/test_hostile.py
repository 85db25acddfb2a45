"""Hostile input, end to end: manifests built to hurt, paths built to escape, and the listener.

Each hostile file must give a clear `FILE:LINE: message` from `agentctl validate` and the
same error in the running controller's status (or, when no agent name can be read, in its
log and the manifest_valid metric), within bounded time and memory, with nothing started
and nothing else disturbed. Agents carry a FAULT_TAG env so they are found and killed by pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_faults import (
    DEADLINE,
    FAST_BACKOFF,
    by_instance,
    holds,
    inst,
    kill_tagged,
    metric_values,
    running,
    sleep_cmd,
    tagged,
)
from tests.helpers import PY, Controller, reap, wait_for

MAX_SECONDS = 15.0  # wall time for one `validate` of one hostile file, start-up of Python included
MAX_RSS_MIB = 250  # peak resident memory of that `validate`


@pytest.fixture
def tag() -> Iterator[str]:
    value = f"hostile-{uuid.uuid4().hex[:12]}"
    yield value
    kill_tagged(value)  # after the controller fixture's own cleanup (set up first, torn down last)


@pytest.fixture
def fctl(tag: str, controller_factory: Callable[..., Controller]) -> Controller:
    return controller_factory()


def header(name: str) -> str:
    """Lines 1-6 of a manifest; the line a test adds is line 7."""
    return (f"apiVersion: agentctl/v1\nkind: Agent\nmetadata:\n  name: {name}\n"
            f"spec:\n  command: [sleep, '900001']\n")


def doc(name: str, line7: str, tag: str) -> str:
    return header(name) + f"  {line7}\n  env: {{FAULT_TAG: {tag}}}\n"


def file_invalid(ctl: Controller, file: str) -> bool:
    """The controller has loaded `file` and found it invalid (agentctl_manifest_valid{source=...} 0)."""
    return any(file in k and v == 0.0 for k, v in metric_values(ctl, "agentctl_manifest_valid").items())


def wait_file_invalid(ctl: Controller, file: str, timeout: float = DEADLINE) -> None:
    wait_for(lambda: file_invalid(ctl, file), timeout, message=f"manifest_valid 0 for {file}")


def run_measured(argv: list[str], cwd: Path) -> tuple[int, str, float, float]:
    """(exit code, stdout+stderr, wall seconds, peak RSS MiB) of one command."""
    began = time.monotonic()
    out_path = cwd / f".out-{os.getpid()}-{time.monotonic_ns()}"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = out_path.read_text(errors="replace")
    out_path.unlink()
    return proc.returncode, text, time.monotonic() - began, usage.ru_maxrss / 1024


def validate(cwd: Path, *paths: str, base: Path | None = None) -> tuple[int, str, float, float]:
    return run_measured([PY, "-m", "controller", "validate", *paths, "--base-dir", str(base or cwd)], cwd)


# =========================================================================================
# 7 + 8. Hostile manifests: the small ones, all in one directory
# =========================================================================================
# file -> (its text, or bytes; a regex its error line must match after "FILE:")
def hostile_files(root: Path, tag: str) -> dict[str, tuple[str | bytes, str]]:
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.env").write_text("STOLEN=yes\n")
    for link, target in (("link-out", outside), ("link-env", outside / "secret.env")):
        if not (root / link).is_symlink():
            (root / link).symlink_to(target)
    return {
        "syntax.yaml": (header("syntax") + "  env: {A: [unclosed\n", r"\d+: YAML syntax error"),
        "types.yaml": (doc("types", "replicas: lots", tag), r"7: spec\.replicas: "),
        "unknown.yaml": (doc("unknown", "bogusField: 1", tag), r"7: .*bogusField"),
        "binary.yaml": (header("binary").encode() + b"  env: {A: \"\xff\xfe\"}\n", r"7: not valid UTF-8"),
        "cwd-dotdot.yaml": (doc("cwd-dotdot", f"cwd: ../{outside.name}", tag), r"7: spec\.cwd: .*outside the base"),
        "cwd-absolute.yaml": (doc("cwd-absolute", f"cwd: {outside}", tag), r"7: spec\.cwd: .*outside the base"),
        "cwd-symlink.yaml": (doc("cwd-symlink", "cwd: link-out", tag), r"7: spec\.cwd: .*outside the base"),
        "envfile-dotdot.yaml": (doc("envfile-dotdot", f"envFiles: [../{outside.name}/secret.env]", tag),
                                r"7: spec\.envFiles\[0\]: .*outside the base"),
        "envfile-absolute.yaml": (doc("envfile-absolute", f"envFiles: [{outside}/secret.env]", tag),
                                  r"7: spec\.envFiles\[0\]: .*outside the base"),
        "envfile-symlink.yaml": (doc("envfile-symlink", "envFiles: [link-env]", tag),
                                 r"7: spec\.envFiles\[0\]: .*outside the base"),
        "env-key-equals.yaml": (header("env-key-equals") + f'  env: {{"A=B": x, FAULT_TAG: {tag}}}\n',
                                r"7: spec\.env\b"),
        "env-key-nul.yaml": (header("env-key-nul") + f'  env: {{"A\\0B": x, FAULT_TAG: {tag}}}\n', r"7: spec\.env\b"),
        "env-value-nul.yaml": (header("env-value-nul") + f'  env: {{A: "x\\0y", FAULT_TAG: {tag}}}\n',
                               r"7: spec\.env\.A\b"),
        "argv-nul.yaml": (("apiVersion: agentctl/v1\nkind: Agent\nmetadata:\n  name: argv-nul\nspec:\n"
                           f'  command: [sleep, "9\\x0001"]\n  env: {{FAULT_TAG: {tag}}}\n'), r"6: spec\.command\.1\b"),
        "name-escape.yaml": (doc("../../../escaped", "replicas: 1", tag), r"4: metadata\.name: "),
    }


NAMED_INVALID = ["types", "unknown", "cwd-dotdot", "cwd-absolute", "cwd-symlink", "envfile-dotdot",
                 "envfile-absolute", "envfile-symlink", "env-key-equals", "env-key-nul", "env-value-nul", "argv-nul"]


def write_hostile(directory: Path, base: Path, tag: str, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    files = {k: v for k, v in hostile_files(base, tag).items() if k not in skip}
    directory.mkdir(parents=True, exist_ok=True)
    for name, (content, _) in files.items():
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return {name: pattern for name, (_, pattern) in files.items()}


def test_validate_names_file_and_line_of_each_hostile_manifest(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    patterns = write_hostile(base / "manifests", base, "validate")
    code, out, seconds, rss = validate(base, "manifests")
    assert code == 1, out
    for name, pattern in patterns.items():
        assert re.search(rf"^manifests/{re.escape(name)}:{pattern}", out, re.MULTILINE), f"{name}: no /{pattern}/ in\n{out}"
    assert seconds < MAX_SECONDS and rss < MAX_RSS_MIB, (seconds, rss)


def test_controller_reports_hostile_manifests_starts_nothing_and_disturbs_nothing(fctl: Controller,
                                                                                 tag: str) -> None:
    ctl = fctl
    ctl.apply("bystander", sleep_cmd(900_000), env={"FAULT_TAG": tag})
    ctl.start()
    bystander = inst(running(ctl, "bystander"))["pid"]
    patterns = write_hostile(ctl.manifests / "hostile", ctl.base, tag, skip=("name-escape.yaml",))
    # each named one: phase Invalid, Valid=False with FILE:LINE: message
    for name in NAMED_INVALID:
        doc = ctl.wait_status(name, lambda d: d.get("phase") == "Invalid", DEADLINE, f"{name} Invalid")
        valid = next(c for c in doc["conditions"] if c["type"] == "Valid")
        assert valid["status"] == "False"
        assert re.search(rf"hostile/{re.escape(name)}\.yaml:{patterns[name + '.yaml']}", valid["message"]), valid
        assert doc["instances"] == []
    # the others (no readable name): the manifest_valid metric names the file
    for file in ("syntax.yaml", "binary.yaml"):
        wait_file_invalid(ctl, file)
    # nothing started, nothing disturbed: a bounded window with the bystander alone and unchanged
    holds(lambda: by_instance(tag) == {"bystander-0": [bystander]}, 1.0, "a hostile manifest started something")
    assert (ctl.status("bystander") or {}).get("restarts") == 0
    assert ctl.proc is not None and ctl.proc.poll() is None


def test_controller_logs_an_unreadable_manifest_file_with_file_and_line(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.start()
    patterns = write_hostile(ctl.manifests, ctl.base, tag, skip=tuple(
        f for f in hostile_files(ctl.base, tag) if f not in ("syntax.yaml", "binary.yaml")))
    for file in patterns:  # first: the controller has loaded the file
        wait_file_invalid(ctl, file)
    for file, pattern in patterns.items():
        assert re.search(rf"{re.escape(file)}:{pattern}", ctl.log()), f"no log line for {file}:\n{ctl.log()[-2000:]}"


def test_manifest_name_with_dot_dot_writes_nothing_outside_the_state_dir(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("bystander", sleep_cmd(900_005), env={"FAULT_TAG": tag})
    ctl.start()
    bystander = inst(running(ctl, "bystander"))["pid"]
    ctl.write("name-escape.yaml", hostile_files(ctl.base, tag)["name-escape.yaml"][0])  # type: ignore[arg-type]
    wait_file_invalid(ctl, "name-escape.yaml")
    # a bounded window after the file was seen: nothing may appear outside the state dir
    holds(lambda: not list(ctl.root.parent.rglob("escaped*")), 1.0, "a file was written outside the state dir")
    assert by_instance(tag) == {"bystander-0": [bystander]}


# =========================================================================================
# 7. The heavy ones: size, alias bombs, nesting, document count
# =========================================================================================
def huge_file(path: Path) -> None:
    """A 50 MB manifest: a valid head and one enormous string."""
    with open(path, "w") as fh:
        fh.write(header("huge") + "  env:\n    PAD: \"")
        fh.writelines("x" * (1 << 20) for _ in range(50))
        fh.write("\"\n")


def alias_bomb(path: Path) -> None:
    """Billion laughs: 9 levels of 9 aliases each, 9^9 strings once expanded."""
    lines = [header("bomb"), "  env: {A: b}\n", "x-lol: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"]
    for level in range(1, 10):
        lines.append(f"x-l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]\n")
    path.write_text("".join(lines))


def deep_file(path: Path) -> None:
    """100 000 nested flow sequences: 200 kB, far under the size limit."""
    depth = 100_000
    path.write_text(header("deep") + "  env: " + "[" * depth + "]" * depth + "\n")


def many_documents(path: Path, count: int = 5000) -> None:
    """Thousands of valid little agents in one file (about 400 kB)."""
    path.write_text("".join(f"---\napiVersion: agentctl/v1\nkind: Agent\nmetadata: {{name: many-{i}}}\n"
                            f"spec: {{command: [sleep, '900002']}}\n" for i in range(count)))


HEAVY = {
    "huge.yaml": (huge_file, r"1: file is \d+ bytes, larger than the limit"),
    "bomb.yaml": (alias_bomb, r"\d+: document expands to more than \d+ nodes"),
    # libyaml may refuse the nesting itself (PyYAML >= 6.0.4) or leave it to our own check: either
    # way the file and line are named; the wording is the parser's, not a behaviour to pin
    "deep.yaml": (deep_file, r"\d+: \S"),
    "many.yaml": (many_documents, r"\d+: more than \d+ documents in one file"),
}


@pytest.mark.parametrize("file", [
    "huge.yaml",
    "bomb.yaml",
    "deep.yaml",
    "many.yaml",
])
def test_validate_refuses_heavy_manifest_in_bounded_time_and_memory(tmp_path: Path, file: str) -> None:
    make, pattern = HEAVY[file]
    make(tmp_path / file)
    code, out, seconds, rss = validate(tmp_path, file)
    assert code == 1, f"exit {code}:\n{out[-2000:]}"
    assert re.search(rf"^{re.escape(file)}:{pattern}", out, re.MULTILINE), out[-2000:]
    assert seconds < MAX_SECONDS, f"{seconds:.1f}s"
    assert rss < MAX_RSS_MIB, f"{rss:.0f} MiB"
    assert len(out.splitlines()) <= 1001, "the error output must stay bounded too"


def test_controller_survives_huge_and_alias_bomb_manifests_and_starts_nothing(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("bystander", sleep_cmd(900_010), env={"FAULT_TAG": tag})
    huge_file(ctl.manifests / "huge.yaml")
    alias_bomb(ctl.manifests / "bomb.yaml")
    ctl.start()  # the first pass, over both, within the start deadline
    bystander = inst(running(ctl, "bystander"))["pid"]
    for file in ("huge.yaml", "bomb.yaml"):
        wait_file_invalid(ctl, file)
    holds(lambda: by_instance(tag) == {"bystander-0": [bystander]}, 1.0, "something else started")
    assert ctl.proc is not None
    with open(f"/proc/{ctl.proc.pid}/status") as fh:
        rss_kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    assert rss_kib < MAX_RSS_MIB * 1024, f"controller RSS {rss_kib} KiB"


def test_controller_survives_a_deeply_nested_manifest(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("bystander", sleep_cmd(900_020), env={"FAULT_TAG": tag})
    ctl.start()
    bystander = inst(running(ctl, "bystander"))["pid"]
    deep_file(ctl.manifests / "deep.yaml")
    wait_file_invalid(ctl, "deep.yaml")
    assert ctl.proc is not None
    assert ctl.proc.poll() is None, f"controller died: {ctl.proc.returncode}"
    assert by_instance(tag) == {"bystander-0": [bystander]}


def test_file_with_thousands_of_documents_creates_nothing(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    many_documents(manifests / "many.yaml")
    code, out, seconds, rss = run_measured(
        [PY, "-m", "controller", "plan", "--manifests", str(manifests), "--state-dir", str(tmp_path / "state"),
         "--base-dir", str(tmp_path)], tmp_path)
    assert code == 0, out[-2000:]
    assert seconds < MAX_SECONDS and rss < MAX_RSS_MIB, (seconds, rss)
    creates = [line for line in out.splitlines() if line.startswith("create ")]
    assert creates == [], f"{len(creates)} agents would be created, e.g. {creates[:3]}"


# =========================================================================================
# 8. A cwd symlink swapped after validation, and names that would escape the state dir
# =========================================================================================
def test_cwd_symlink_swapped_after_validation_is_caught_at_spawn_time(fctl: Controller, tag: str) -> None:
    ctl = fctl
    work = ctl.base / "work"
    work.mkdir()
    outside = ctl.root.parent / "swap-outside"
    outside.mkdir()
    ctl.apply("swapped", sleep_cmd(900_030), cwd="work", env={"FAULT_TAG": tag}, backoff=FAST_BACKOFF)
    ctl.start()
    pid = inst(running(ctl, "swapped"))["pid"]
    assert os.readlink(f"/proc/{pid}/cwd") == str(work.resolve())
    work.rename(ctl.base / "work.real")
    work.symlink_to(outside)  # the swap: same path, now leading out of the base dir
    os.kill(pid, signal.SIGKILL)  # the next start is a spawn after validation
    reap(pid)

    def cwds() -> set[str]:
        return {os.readlink(f"/proc/{p}/cwd") for p in tagged(tag) if os.path.exists(f"/proc/{p}/cwd")}

    doc = ctl.wait_status("swapped", lambda d: "outside the base dir" in json.dumps(d), DEADLINE,
                          "the spawn-time refusal in status")
    assert str(outside) not in cwds()
    holds(lambda: str(outside) not in cwds(), 1.0, "an instance was started outside the base dir")
    assert doc["phase"] != "Running"


def test_cli_names_with_dot_dot_reach_nothing_outside_the_state_dir(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("real", sleep_cmd(900_040), env={"FAULT_TAG": tag})
    ctl.start()
    running(ctl, "real")
    (ctl.root / "secret-0.log").write_text("top secret\n")  # <state>/logs/../../secret-0.log
    cases = {
        ("logs", "../../secret"): "top secret",  # would print a file outside the state dir
        ("describe", "../../manifests/real"): "real",  # would render a manifest as if it were a status
        ("restart", "../../../x"): "",
    }
    for args, leak in cases.items():
        result = ctl.cli(*args)
        assert result.returncode == 1, (args, result.returncode, result.stdout[-500:], result.stderr[-500:])
        assert not leak or leak not in result.stdout, (args, result.stdout[-500:])
    assert not list(ctl.root.parent.rglob("*.restart")), "a restart request was written outside requests/"


# =========================================================================================
# 9. Permissions and the listener
# =========================================================================================
def test_state_dir_and_everything_in_it_is_private(fctl: Controller, tag: str) -> None:
    ctl = fctl
    old_umask = os.umask(0o022)  # a usual umask: what the controller creates must not depend on it
    try:
        ctl.apply("private", ["sh", "-c", "echo hello; exec sleep 900050"], env={"FAULT_TAG": tag},
                  logs={"maxBytes": 1024, "backups": 1})
        ctl.start()
        running(ctl, "private")
        wait_for(lambda: (ctl.state / "logs" / "private-0.log").exists(), DEADLINE, message="log")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(ctl.state.stat().st_mode) == 0o700
    seen = []
    for path in [ctl.state, *ctl.state.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        seen.append(path.name)
        if path.is_dir():
            assert mode == 0o700, f"{path}: {oct(mode)}"
        else:
            assert mode & 0o037 == 0, f"{path}: {oct(mode)} (group may read at most, others nothing)"
        if path.parent.name in ("logs", "status") and path.is_file():
            assert mode in (0o600, 0o640), f"{path}: {oct(mode)}"
    assert {"state.db", "private-0.log", "private.yaml"} <= set(seen), seen


def test_manifests_dir_writable_by_others_is_refused_unless_allowed(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("open", sleep_cmd(900_060), env={"FAULT_TAG": tag})
    os.chmod(ctl.manifests, 0o777)
    ctl.start(wait_ready=False)
    assert ctl.proc is not None
    assert ctl.proc.wait(DEADLINE) == 2, ctl.log()[-2000:]
    log = ctl.log()
    assert str(ctl.manifests) in log and "writable by other users" in log and "--allow-insecure-manifests" in log, log
    assert tagged(tag) == {}
    ctl.start("--allow-insecure-manifests")
    running(ctl, "open")
    assert ctl.stop(signal.SIGTERM) == 0
    # a safe dir holding one world-writable file: that file is refused, the others run
    os.chmod(ctl.manifests, 0o755)
    ctl.apply("safe", sleep_cmd(900_061), env={"FAULT_TAG": tag})
    os.chmod(ctl.manifests / "open.yaml", 0o666)
    ctl.start()
    running(ctl, "safe")
    ctl.wait_status("open", lambda d: "writable by other users" in json.dumps(d), DEADLINE, "open refused")
    wait_file_invalid(ctl, "open.yaml")


def test_http_listener_refuses_every_method_that_could_change_state(fctl: Controller, tag: str) -> None:
    ctl = fctl
    ctl.apply("steady", sleep_cmd(900_070), env={"FAULT_TAG": tag})
    ctl.start()
    pid = inst(running(ctl, "steady"))["pid"]
    manifest_before = (ctl.manifests / "steady.yaml").read_bytes()
    for path in ("/api/v1/agents/steady", "/api/v1/agents", "/metrics", "/readyz", "/api/v1/agents/steady/restart"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            code, body = ctl.http(path, method=method)
            assert code == 405, (method, path, code, body[:200])
    # nothing changed: the same process, no restart, the manifest untouched
    holds(lambda: by_instance(tag) == {"steady-0": [pid]}, 0.5, "a refused request changed something")
    assert (ctl.status("steady") or {}).get("restarts") == 0
    assert (ctl.manifests / "steady.yaml").read_bytes() == manifest_before
    assert ctl.http("/api/v1/agents/steady")[0] == 200


def _sockets_of(pid: int) -> list[tuple[str, str, int, str]]:
    """(proto, local address, port, state) of every inet socket the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{proto}") as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[9] not in inodes:
                    continue
                hex_addr, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_addr)
                # /proc/net shows each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                found.append((proto, socket.inet_ntop(family, raw), int(hex_port, 16), fields[3]))
    return found


def _loopback(addr: str) -> bool:
    return addr == "::1" or addr.startswith(("127.", "::ffff:127."))


def test_nothing_listens_beyond_loopback_unless_asked(tag: str, controller_factory: Any) -> None:
    ctl = controller_factory("loop")
    ctl.apply("quiet", sleep_cmd(900_080), env={"FAULT_TAG": tag})
    ctl.start()
    running(ctl, "quiet")
    assert ctl.proc is not None
    sockets = _sockets_of(ctl.proc.pid)
    listening = [s for s in sockets if s[3] == "0A" or s[0].startswith("udp")]
    assert listening, sockets
    assert all(_loopback(addr) for _, addr, _, _ in listening), listening
    assert ctl.stop(signal.SIGTERM) == 0
    # asked for explicitly: it does listen there, and says so
    wide = controller_factory("wide")
    wide.start("--metrics-addr", "0.0.0.0:0")
    assert wide.proc is not None
    assert any(addr == "0.0.0.0" for _, addr, _, state in _sockets_of(wide.proc.pid) if state == "0A")
    assert re.search(r"WARNING .*non-loopback address 0\.0\.0\.0", wide.log()), wide.log()[-2000:]
