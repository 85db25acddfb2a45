"""Log lines an operator reads: Git fetch errors said once, JSON lines with agent/instance/action/reason."""

from __future__ import annotations

import json
import logging

from controller.cli import JsonFormatter
from controller.gitsource import fetch_error
from controller.opsview import logfields


def test_a_fetch_error_names_the_url_and_says_git_fetch_once() -> None:
    message = fetch_error("file:///srv/fleet.git", "git fetch failed: fatal: repository not found")
    assert message == "git fetch of file:///srv/fleet.git failed: fatal: repository not found"
    assert message.count("git fetch") == 1
    other = fetch_error("u", "path 'agents' not found in revision abc")
    assert other == "git fetch of u failed: path 'agents' not found in revision abc"


def test_json_lines_carry_the_action_fields_and_leave_out_empty_ones() -> None:
    record = logging.LogRecord("agentctl", logging.INFO, __file__, 1, "%s Exited(3)", ("a-0",), None)
    for key, value in logfields("a", "a-0", "exit", "Error").items():
        setattr(record, key, value)
    line = json.loads(JsonFormatter().format(record))
    assert (line["msg"], line["agent"], line["instance"], line["action"], line["reason"]) == (
        "a-0 Exited(3)", "a", "a-0", "exit", "Error")
    plain = json.loads(JsonFormatter().format(
        logging.LogRecord("agentctl", logging.INFO, __file__, 1, "hello", (), None)))
    assert set(plain) == {"time", "level", "logger", "msg"}
    bare = logging.LogRecord("agentctl", logging.INFO, __file__, 1, "x", (), None)
    for key, value in logfields("a", None, "delete", "").items():
        setattr(bare, key, value)
    assert "instance" not in json.loads(JsonFormatter().format(bare))
    assert "reason" not in json.loads(JsonFormatter().format(bare))
