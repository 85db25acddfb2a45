"""The HTTP listener under hostile local users (CONTRACT §11): bounded connections and threads,
idle and slow clients dropped, Host names checked, log lines only for dashboard sessions.

Every test runs the real `agentctl run`. The flood comes from a second local user made with
useradd for the test (and removed after), so it shows what any user of the host can do.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.listener import HEAD_TIMEOUT, MAX_CONNECTIONS, WORKERS
from controller.web.access import TOKEN_TTL, token_dir
from tests.helpers import Controller, kill_group, py, sleeper, wait_for

FLOOD = 600  # idle connections the other user keeps open (the bound is MAX_CONNECTIONS)
FD_SLACK = 24  # the controller's own fds that come and go: store, logs, pidfds, tmux pipes


def request(port: int, path: str, *, host: str | None = None, headers: dict[str, str] | None = None,
            addr: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(addr, port, timeout=20)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get(ctl: Controller, path: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
    return request(ctl.port, path, host=f"127.0.0.1:{ctl.port}", **kwargs)  # type: ignore[arg-type]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# ------------------------------------------------------------- a second local user


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs root and useradd/userdel to create a second local user")
    name = f"actl-flood-{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, timeout=60)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)


def python_for(user: pwd.struct_passwd) -> str:
    """A Python the other user may run (ours may sit under root's home)."""
    for candidate in (sys._base_executable, "/usr/bin/python3", shutil.which("python3")):  # type: ignore[attr-defined]
        try:
            if candidate and subprocess.run([candidate, "-I", "-S", "-c", "pass"], user=user.pw_uid,
                                            group=user.pw_gid, cwd="/", capture_output=True, timeout=60).returncode == 0:
                return str(candidate)
        except PermissionError:
            continue
    pytest.skip("no Python interpreter that the second user may run")


FLOODER = textwrap.dedent("""
    import socket, sys, time
    port, want, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    socks, made, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        # keep `want` connections open, never sending a byte; re-open what the server closed
        alive = []
        for s in socks:
            try:
                s.setblocking(False)
                gone = s.recv(1) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                s.close()
            else:
                alive.append(s)
        socks = alive
        while len(socks) < want and time.monotonic() < end:
            s = socket.socket()
            s.settimeout(1)
            try:
                s.connect(("127.0.0.1", port))
                socks.append(s)
                made += 1
            except OSError:
                s.close()
            if made % 50 == 0:
                print(made, flush=True)  # progress, also while the first round is still opening
        print(made, flush=True)
        time.sleep(0.05)
""")


def test_idle_connection_flood_by_another_user_leaves_supervision_and_healthz_working(
        ctl: Controller, other_user: pwd.struct_passwd) -> None:
    ctl.apply("steady", sleeper())
    ctl.start()
    ctl.wait_phase("steady", "Running", timeout=60)
    pid = ctl.proc.pid if ctl.proc else 0
    fds_before, threads_before = fd_count(pid), thread_count(pid)
    flooder = subprocess.Popen([python_for(other_user), "-I", "-S", "-c", FLOODER, str(ctl.port), str(FLOOD), "120"],
                               user=other_user.pw_uid, group=other_user.pw_gid, cwd="/", start_new_session=True,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout is not None
        # the flood is on once the other user has opened all its connections (far more than the bound)
        made = wait_for(lambda: int(flooder.stdout.readline() or 0) >= FLOOD, timeout=90,  # type: ignore[union-attr]
                        interval=0.01, message="flooder past the connection bound")
        assert made
        peak_fds, peak_threads = fd_count(pid), thread_count(pid)
        ctl.apply("newcomer", sleeper("newcomer up"))  # supervision and manifest reads go on
        for _ in range(20):
            assert get(ctl, "/healthz")[0] == 200
            peak_fds, peak_threads = max(peak_fds, fd_count(pid)), max(peak_threads, thread_count(pid))
        ctl.wait_phase("newcomer", "Running", timeout=60)
        assert ctl.wait_phase("steady", "Running")["restarts"] == 0
        assert flooder.poll() is None, "the flood was still going on"
        peak_fds = max(peak_fds, fd_count(pid))
    finally:
        kill_group(flooder.pid)
        flooder.wait(10)
        if flooder.stdout is not None:
            flooder.stdout.close()
    print(f"fds before {fds_before}, peak during a {FLOOD}-connection flood {peak_fds}; "
          f"threads before {threads_before}, peak {peak_threads}")
    assert peak_fds <= fds_before + MAX_CONNECTIONS + FD_SLACK
    assert peak_threads <= threads_before + 4  # the worker pool is made at start: no thread per connection
    wait_for(lambda: fd_count(pid) <= fds_before + FD_SLACK, timeout=30, message="the flood's sockets closed")


def test_a_client_that_trickles_its_request_head_is_dropped(ctl: Controller) -> None:
    ctl.start()
    sock = socket.create_connection(("127.0.0.1", ctl.port), timeout=5)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        deadline = time.monotonic() + HEAD_TIMEOUT + 15

        def dropped() -> bool:
            try:
                sock.sendall(b"X")  # a byte every poll: never idle, never done
                return sock.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True
        wait_for(dropped, timeout=deadline - time.monotonic(), interval=0.5, message="slow client dropped")
    finally:
        sock.close()
    assert get(ctl, "/healthz")[0] == 200


def test_workers_are_few_and_made_once(ctl: Controller) -> None:
    ctl.start()
    pid = ctl.proc.pid if ctl.proc else 0
    before = thread_count(pid)
    for _ in range(3 * WORKERS):
        assert get(ctl, "/api/v1/agents")[0] == 200
    assert thread_count(pid) == before


# ------------------------------------------------------------- Host names


def test_requests_for_other_host_names_get_403_and_allowed_ones_are_answered(ctl: Controller) -> None:
    ctl.apply("steady", sleeper())
    ctl.start("--http-allowed-hosts", "agents.example,proxy.example:8443")
    port = ctl.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "agents.example", "agents.example:80",
                 "proxy.example:8443"):
        code, _, body = request(port, "/api/v1/agents", host=host)
        assert code == 200, (host, body)
    for host in ("attacker.example", f"attacker.example:{port}", "proxy.example:9999", f"127.0.0.2:{port}", None):
        for path in ("/api/v1/agents", "/", "/metrics", "/agents/steady"):
            code, headers, body = request(port, path, host=host)
            assert code == 403 and headers["content-type"] == "application/json", (host, path)
            assert "error" in json.loads(body) and b"steady" not in body


def test_allowed_hosts_come_from_the_config_file_and_bad_ones_are_refused(ctl: Controller) -> None:
    config = ctl.root / "config.yaml"
    config.write_text("httpAllowedHosts: cfg.example\n")
    ctl.start("--config", str(config))
    assert request(ctl.port, "/healthz", host="cfg.example")[0] == 200
    ctl.stop()
    bad = subprocess.run([*ctl.args("--http-allowed-hosts", "http://x.example/")], capture_output=True, text=True,
                         timeout=60, cwd=ctl.root)
    assert bad.returncode == 2 and "--http-allowed-hosts" in bad.stderr


def test_listener_on_ipv6_loopback_answers_its_bracketed_address(ctl: Controller) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    ctl.start("--metrics-addr", "[::1]:0", wait_ready=False)
    info = wait_for(lambda: (ctl.state / "controller.json").exists() and json.loads(
        (ctl.state / "controller.json").read_text()), timeout=30, message="controller.json")
    port = int(info["metricsAddr"].rsplit(":", 1)[1])
    assert request(port, "/healthz", host=f"[::1]:{port}", addr="::1")[0] == 200
    assert request(port, "/healthz", host=f"localhost:{port}", addr="::1")[0] == 200
    assert request(port, "/healthz", host=f"evil.example:{port}", addr="::1")[0] == 403


# ------------------------------------------------------------- log lines and the access token


def prints_then_fails() -> list[str]:
    return py(f"""
        import os, sys
        print("visible line", 6 * 7, flush=True)  # the words are not in the argv (runningSpec shows it)
        print("password is " + os.environ["DB_PASSWORD"], flush=True)
        sys.exit(1)
    """)


def dashboard_url(ctl: Controller) -> str:
    result = ctl.cli("dashboard", "--url")
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith(f"http://127.0.0.1:{ctl.port}/?token="), url
    return url


def redeem(ctl: Controller, url: str) -> tuple[int, dict[str, str]]:
    code, headers, _ = get(ctl, url.removeprefix(f"http://127.0.0.1:{ctl.port}"))
    return code, headers


def test_log_lines_and_env_values_only_with_a_dashboard_session(ctl: Controller) -> None:
    (ctl.root / "secret.env").write_text("DB_PASSWORD=hunter2-very-secret\n")
    ctl.apply("leaky", prints_then_fails(), envFiles=["secret.env"], restartPolicy="Never")
    ctl.start()
    ctl.wait_status("leaky", lambda d: d["phase"] == "Failed" and any(
        "visible line 42" in line for i in d["instances"] for line in (i.get("lastExit") or {}).get("logTail", [])),
        timeout=60, message="leaky failed with its log tail recorded")
    paths = ("/api/v1/agents", "/api/v1/agents/leaky", "/", "/agents/leaky", "/agents/leaky?part=main")
    for path in paths:
        code, _, body = get(ctl, path)
        assert code == 200, path
        assert b"visible line 42" not in body and b"hunter2" not in body, path
    doc = json.loads(get(ctl, "/api/v1/agents/leaky")[2])
    assert doc["instances"][0]["lastExit"]["logTail"] == [] and doc["instances"][0]["lastExit"]["exitCode"] == 1

    code, headers = redeem(ctl, dashboard_url(ctl) + "&x=1")
    assert code == 303 and headers["location"] == "/?x=1"
    cookie = headers["set-cookie"]
    name_value = cookie.split(";", 1)[0]
    assert name_value.startswith(f"agentctl_session_{ctl.port}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = {"Cookie": name_value}
    code, _, body = get(ctl, "/agents/leaky", headers=session)
    assert code == 200 and b"visible line 42" in body
    # lines shown by the controller have the instance's env values redacted, also to the owner (§11)
    assert b"hunter2-very-secret" not in body and b"password is [REDACTED]" in body
    api = json.loads(get(ctl, "/api/v1/agents/leaky", headers=session)[2])
    assert any("visible line 42" in line for line in api["instances"][0]["lastExit"]["logTail"])
    assert b"DB_PASSWORD" not in get(ctl, "/agents/leaky", headers=session)[2]  # no env key=value table anywhere
    # a made-up or stale cookie is no session
    assert b"visible line 42" not in get(ctl, "/agents/leaky", headers={"Cookie": name_value[:-3] + "abc"})[2]


def test_a_token_works_once_and_only_when_made_by_dashboard_recently(ctl: Controller) -> None:
    ctl.start()
    url = dashboard_url(ctl)
    tokens = token_dir(ctl.state)
    assert tokens.stat().st_mode & 0o777 == 0o700
    files = list(tokens.iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert url.rsplit("=", 1)[1] not in files[0].name  # only a hash of it is on disk
    assert redeem(ctl, url)[0] == 303
    assert redeem(ctl, url)[0] == 403  # used
    assert not list(tokens.iterdir())

    stale = dashboard_url(ctl)
    old = time.time() - TOKEN_TTL - 60
    for f in tokens.iterdir():
        os.utime(f, (old, old))
    assert redeem(ctl, stale)[0] == 403

    loose = dashboard_url(ctl)
    for f in tokens.iterdir():
        f.chmod(0o644)  # not a file only its owner can read: not one `dashboard` made
    assert redeem(ctl, loose)[0] == 403
    assert redeem(ctl, f"http://127.0.0.1:{ctl.port}/?token=../../state.db")[0] == 403
    # the redirect goes back to a page of ours only, never to another site
    for target, location in (("/agents/x/", "/agents/x/"), ("/\\evil.example/", "/"), ("//evil.example/", "/"),
                             ("/%2F%2Fevil.example", "/")):
        token = dashboard_url(ctl).rsplit("=", 1)[1]
        code, headers = redeem(ctl, f"{target}?token={token}")
        assert (code, headers["location"]) == (303, location), target
    assert redeem(ctl, f"http://127.0.0.1:{ctl.port}/?token=")[0] == 403


def test_dashboard_without_a_controller_exits_1(ctl: Controller) -> None:
    result = ctl.cli("dashboard", "--url")
    assert result.returncode == 1 and "no controller is running" in result.stderr
    assert result.stdout == ""
    ctl.start()
    ctl.stop()
    result = ctl.cli("dashboard")
    assert result.returncode == 1 and "no controller is running" in result.stderr


def test_dashboard_without_a_desktop_only_prints(ctl: Controller, tmp_path: Path) -> None:
    ctl.start()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    # a BROWSER that would leave a mark if it were ever run
    env["BROWSER"] = f"{sys.executable} -c 'open(\"{tmp_path}/opened\", \"w\")' %s"
    result = subprocess.run([sys.executable, "-m", "controller", "dashboard", "--state-dir", str(ctl.state)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0 and "/?token=" in result.stdout
    assert not (tmp_path / "opened").exists()



def test_with_its_fd_table_full_the_listener_makes_room_instead_of_spinning(ctl: Controller) -> None:
    import resource

    ctl.apply("steady", sleeper())
    ctl.start()
    ctl.wait_phase("steady", "Running", timeout=60)
    pid = ctl.proc.pid if ctl.proc else 0
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held: list[socket.socket] = []
    try:
        # a few fds to spare, far fewer than the connection bound: accept() fails with EMFILE
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (fd_count(pid) + 6, limits[1]))
        for _ in range(40):
            held.append(socket.create_connection(("127.0.0.1", ctl.port), timeout=5))
        for _ in range(5):
            assert get(ctl, "/healthz")[0] == 200  # an idle connection was closed to make room
        assert fd_count(pid) <= limits[0]
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        for s in held:
            s.close()
    assert ctl.proc is not None and ctl.proc.poll() is None
    assert ctl.wait_phase("steady", "Running")["restarts"] == 0


def test_another_local_user_cannot_get_an_access_token(ctl: Controller, other_user: pwd.struct_passwd) -> None:
    ctl.start()
    python = python_for(other_user)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join([str(Path(__file__).parents[2]), *site])}
    probe = subprocess.run([python, "-c", "import controller.cli"], user=other_user.pw_uid, group=other_user.pw_gid,
                           cwd="/", env=env, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"the second user cannot import agentctl from this checkout: {probe.stderr[-300:]}")
    result = subprocess.run([python, "-m", "controller", "dashboard", "--url", "--state-dir", str(ctl.state)],
                            user=other_user.pw_uid, group=other_user.pw_gid, cwd="/", env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not accessible to this user" in result.stderr, result.stderr
    assert "token=" not in result.stdout
    assert not token_dir(ctl.state).exists() or not list(token_dir(ctl.state).iterdir())
