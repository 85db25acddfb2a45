"""The status page's pure parts: HTML escaping of hostile values, the REASON column, Host names,
request heads. Rendering gets `now` as a parameter; nothing here opens a socket."""

from __future__ import annotations

from typing import Any

import pytest

from controller.http import Reply, parse_head, without_logs
from controller.settings import parse_allowed_hosts
from controller.web import render
from controller.web.access import host_allowed, own_hosts

NOW = 1_800_000_000.0
HOSTILE = '<img src=x onerror="alert(1)">&amp;</pre><script>x()</script>'


def doc(name: str = "alpha", phase: str = "Running", **extra: Any) -> dict[str, Any]:
    return {"name": name, "phase": phase, "replicas": {"desired": 1, "ready": 1 if phase == "Running" else 0},
            "restarts": 0, "createdAt": "2027-01-15T07:50:00Z", "supervisor": "process", "source": "m/a.yaml",
            "conditions": [{"type": "Valid", "status": "True", "reason": "Parsed", "message": ""},
                           {"type": "Ready", "status": "True" if phase == "Running" else "False",
                            "reason": "Running" if phase == "Running" else phase, "message": ""}],
            "instances": [], **extra}


def crashed(line: str) -> dict[str, Any]:
    last = {"exitCode": 3, "signal": None, "at": "2027-01-15T07:59:00Z", "runtimeSeconds": 1.0, "reason": "Error",
            "logTail": [line]}
    return doc("beta", "BackOff", instances=[{"id": "beta-0", "state": "exited", "pid": None, "lastExit": last}])


def test_hostile_agent_output_and_labels_are_shown_as_text_never_as_markup() -> None:
    d = crashed(HOSTILE)
    d["labels"] = {"team": HOSTILE}
    d["lastError"] = HOSTILE
    extras = render.Extras(logs_allowed=True, log_tails={"beta-0": [HOSTILE]}, screens={"beta-0": HOSTILE},
                           events=[render.EventRow(NOW, "beta-0", "Exited", "Error", HOSTILE)])
    html = render.page("t", render.agent_main(d, NOW, extras), refresh="/agents/beta?part=main", logs_allowed=True)
    assert "<img" not in html and "<script>x" not in html and "</pre><script>" not in html
    assert html.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;amp;") >= 5


def test_log_lines_are_left_out_of_the_page_without_access() -> None:
    main = render.agent_main(crashed("the secret line"), NOW, render.Extras())
    assert "the secret line" not in main and "agentctl dashboard" in main
    assert "the secret line" in render.agent_main(crashed("the secret line"), NOW, render.Extras(logs_allowed=True))


def test_the_api_without_access_keeps_the_shape_but_no_log_line() -> None:
    shown = without_logs(crashed("the secret line"))
    assert shown["instances"][0]["lastExit"]["logTail"] == []
    assert shown["instances"][0]["lastExit"]["exitCode"] == 3


def test_index_rows_carry_name_phase_ready_restarts_age_reason_last_exit() -> None:
    html = render.index_main([doc("alpha"), crashed("x")], NOW)
    assert '<tr data-agent="beta" data-phase="BackOff">' in html
    assert '<td data-label="Age">10m</td>' in html
    assert '<td data-label="Reason">BackOff</td>' in html and '<td data-label="Last exit">Error (exit 3), 1m ago</td>' in html
    assert render.index_main([], NOW).startswith('<p class="empty">')


@pytest.mark.parametrize(("conditions", "phase", "want"), [
    ([("Valid", "True", "Parsed"), ("Ready", "True", "Running")], "Running", ""),
    ([("Valid", "False", "DuplicateName"), ("Ready", "True", "Running")], "Running", "DuplicateName"),
    ([("Valid", "True", "Parsed"), ("Ready", "False", "CrashLoop")], "Failed", "CrashLoop"),
    ([("Valid", "True", "Parsed"), ("Ready", "False", "Completed")], "Completed", ""),
])
def test_reason_is_empty_when_all_is_well_else_the_one_thing_to_know(
        conditions: list[tuple[str, str, str]], phase: str, want: str) -> None:
    d = {"phase": phase, "conditions": [{"type": t, "status": s, "reason": r} for t, s, r in conditions]}
    assert render.reason(d) == want


@pytest.mark.parametrize(("bound", "header", "extra", "ok"), [
    ("127.0.0.1", "127.0.0.1:9478", (), True),
    ("127.0.0.1", "LOCALHOST:9478", (), True),
    ("127.0.0.1", "localhost:9479", (), False),
    ("127.0.0.1", "evil.example:9478", (), False),
    ("127.0.0.1", "127.0.0.1", (), False),
    ("127.0.0.1", None, (), False),
    ("127.0.0.1", "", (), False),
    ("::1", "[::1]:9478", (), True),
    ("::1", "127.0.0.1:9478", (), False),
    ("127.0.0.1", "agents.example", ("agents.example",), True),
    ("127.0.0.1", "agents.example:8443", ("agents.example",), True),
    ("127.0.0.1", "agents.example:8443", ("agents.example:443",), False),
    ("127.0.0.1", "x.agents.example:9478", ("agents.example",), False),
    ("0.0.0.0", "127.0.0.1:9478", (), True),
    ("192.0.2.7", "192.0.2.7:9478", (), True),
    ("192.0.2.7", "localhost:9478", (), False),
])
def test_only_the_listeners_own_address_or_an_allowed_name_is_answered(
        bound: str, header: str | None, extra: tuple[str, ...], ok: bool) -> None:
    assert host_allowed(header, own_hosts(bound, 9478), extra) is ok


def test_allowed_hosts_flag_takes_names_with_or_without_port_and_rejects_urls() -> None:
    assert parse_allowed_hosts("Agents.Example, b.example:8080,,[::1]:80") == (
        "agents.example", "b.example:8080", "[::1]:80")
    assert parse_allowed_hosts(["a.example"]) == ("a.example",)
    for bad in ("http://a.example", "a.example/path", "a b", "a.example:port"):
        with pytest.raises(ValueError, match="allowed host"):
            parse_allowed_hosts(bad)


def test_request_heads_are_parsed_or_refused() -> None:
    req = parse_head(b"GET /agents/a?token=t&part=main HTTP/1.1\r\nHost: h:1\r\nCookie: a=b\r\n\r\nrest")
    assert not isinstance(req, Reply)
    assert (req.method, req.path, dict(req.query), req.headers["Host"], req.extra) == (
        "GET", "/agents/a", {"token": "t", "part": "main"}, "h:1", b"rest")
    for bad in (b"garbage\r\n\r\n", b"GET /\r\n\r\n", b"GET / SPDY/3\r\n\r\n", b"G\x00T / HTTP/1.1\r\n\r\n"):
        refused = parse_head(bad)
        assert isinstance(refused, Reply) and refused.code == 400, bad
    huge = parse_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
    assert isinstance(huge, Reply) and huge.code == 431


def test_a_wildcard_bind_answers_every_address_of_the_host_and_no_other() -> None:
    own = own_hosts("0.0.0.0", 9478, ("192.0.2.2", "fd00::2"))
    for header in ("192.0.2.2:9478", "[fd00::2]:9478", "127.0.0.1:9478", "localhost:9478", "[::1]:9478"):
        assert host_allowed(header, own, ()), header
    for header in ("198.51.100.9:9478", "gpu-1.internal:9478", "192.0.2.2:9479"):
        assert not host_allowed(header, own, ()), header
