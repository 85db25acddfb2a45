"""manifests.parse_text on inline YAML: valid documents, `FILE:LINE: message` errors, hostile-input limits."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import yaml

from controller import manifests
from controller.manifests import MAX_DEPTH, MAX_DOCUMENTS, ManifestError, json_schema, parse_text, signal_number


def errors_of(text: str, file: str = "agents/a.yaml") -> list[str]:
    docs, errors = parse_text(textwrap.dedent(text), file)
    assert not docs
    return [str(e) for e in errors]


def only_error(text: str, file: str = "agents/a.yaml") -> ManifestError:
    docs, errors = parse_text(textwrap.dedent(text), file)
    assert not docs and len(errors) == 1, [str(e) for e in errors]
    return errors[0]


VALID = """\
apiVersion: agentctl/v1
kind: Agent
metadata:
  name: reviewer
  labels: {team: infra}
spec:
  command: ["python3", "-u", "agent.py"]
  replicas: 2
---
# a comment-only document between two agents is skipped
---
apiVersion: agentctl/v1
kind: Agent
metadata: {name: writer}
spec:
  provider: claude
  model: opus
  stop: {signal: INT, gracePeriodSeconds: 0}
  liveness: {httpGet: {url: "http://127.0.0.1:8080/healthz"}, periodSeconds: 2}
"""


def test_valid_multi_document_file_yields_every_agent_with_its_line() -> None:
    docs, errors = parse_text(VALID, "a.yaml")
    assert errors == []
    assert [(d.manifest.metadata.name, d.line) for d in docs] == [("reviewer", 1), ("writer", 12)]
    reviewer, writer = (d.manifest for d in docs)
    assert reviewer.spec.replicas == 2 and reviewer.metadata.labels == {"team": "infra"}
    assert writer.spec.provider == "claude" and writer.spec.stop.grace_period_seconds == 0
    # a valid document keeps the lines later checks report (provider, cwd, envFiles, name)
    assert (docs[1].line_of("spec", "provider"), docs[1].line_of("metadata", "name")) == (16, 14)


def test_omitted_fields_get_the_contract_defaults() -> None:
    docs, _ = parse_text("apiVersion: agentctl/v1\nkind: Agent\nmetadata: {name: a}\nspec: {command: [x]}\n", "a.yaml")
    spec = docs[0].manifest.spec
    assert (spec.replicas, spec.supervisor, spec.restart_policy, spec.suspend) == (1, "process", "Always", False)
    assert (spec.backoff.initial_seconds, spec.backoff.max_seconds, spec.backoff.reset_after_seconds) == (1, 300, 600)
    assert (spec.stop.signal, spec.stop.grace_period_seconds) == ("SIGTERM", 10)
    assert (spec.logs.max_bytes, spec.logs.backups) == (10485760, 3)
    assert spec.max_restarts is None and spec.liveness is None and spec.placement is None


HEAD = """\
apiVersion: agentctl/v1
kind: Agent
metadata:
  name: reviewer
spec:
  command: [python3, agent.py]
"""


@pytest.mark.parametrize(("body", "line", "fragment"), [
    ("  colour: blue\n", 7, "spec.colour: Extra inputs are not permitted"),
    ("  replicas: \"3\"\n", 7, "spec.replicas: Input should be a valid integer"),
    ("  replicas: 101\n", 7, "spec.replicas: Input should be less than or equal to 100"),
    ("  replicas: -1\n", 7, "spec.replicas: Input should be greater than or equal to 0"),
    ("  env: {1BAD: x}\n", 7, "spec.env.1BAD"),
    ("  supervisor: docker\n", 7, "spec.supervisor"),
    ("  restartPolicy: Sometimes\n", 7, "spec.restartPolicy"),
    ("  stop:\n    signal: SIGTERM\n    gracePeriodSeconds: 601\n", 9,
     "spec.stop.gracePeriodSeconds: Input should be less than or equal to 600"),
    ("  stop:\n    signal: SIGBOGUS\n", 8, "spec.stop.signal: unknown signal 'SIGBOGUS'"),
    ("  liveness:\n    periodSeconds: 5\n", 7,
     "spec.liveness: liveness needs exactly one of logIdleSeconds, exec, httpGet"),
    ("  liveness:\n    logIdleSeconds: 60\n    exec: [\"true\"]\n", 7,
     "spec.liveness: liveness needs exactly one of logIdleSeconds, exec, httpGet"),
    ("  liveness:\n    httpGet:\n      url: http://10.0.0.5:8080/healthz\n", 9,
     "spec.liveness.httpGet.url: httpGet.url must be http:// on a loopback address"),
    ("  maxRestarts: {count: 5}\n", 7, "spec.maxRestarts.windowSeconds: Field required"),
    ("  model: opus\n", 5, "spec: model is only meaningful with a provider"),
])
def test_invalid_field_is_reported_at_its_own_line(body: str, line: int, fragment: str) -> None:
    err = only_error(HEAD + body)
    assert (err.file, err.line, err.agent) == ("agents/a.yaml", line, "reviewer")
    assert fragment in err.message
    assert str(err).startswith(f"agents/a.yaml:{line}: ")


@pytest.mark.parametrize("url", [
    "http://example.com/healthz", "https://127.0.0.1/x", "http://127.0.0.1.evil.com/x",
    "http://localhost@evil.com/", "http://localhost:80@evil.com/", "http://0.0.0.0:80/",
])
def test_http_liveness_probe_must_stay_on_loopback(url: str) -> None:
    err = only_error(HEAD + f"  liveness:\n    httpGet: {{url: {json.dumps(url)}}}\n")
    assert "loopback" in err.message and err.line == 8


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/healthz", "http://localhost/", "http://[::1]:9/x",
                                 "http://127.1.2.3"])
def test_http_liveness_probe_on_loopback_is_accepted(url: str) -> None:
    docs, errors = parse_text(HEAD + f"  liveness:\n    httpGet: {{url: {json.dumps(url)}}}\n", "a.yaml")
    assert errors == [] and len(docs) == 1


@pytest.mark.parametrize("name", ["Reviewer", "-reviewer", "reviewer-", "re_viewer", "a" * 64, ""])
def test_bad_agent_name_is_reported_at_the_name_line(name: str) -> None:
    err = only_error(HEAD.replace("name: reviewer", f"name: {json.dumps(name)}"))
    assert err.line == 4 and err.message.startswith("metadata.name: ")


@pytest.mark.parametrize("name", ["a", "reviewer-2", "0abc", "a" * 63])
def test_good_agent_names_are_accepted(name: str) -> None:
    docs, errors = parse_text(HEAD.replace("name: reviewer", f"name: {name}"), "a.yaml")
    assert errors == [] and docs[0].manifest.metadata.name == name


@pytest.mark.parametrize("name", ["SIGTERM", "TERM", "term", "15", "SIGHUP", "INT"])
def test_stop_signal_can_be_named_with_or_without_sig_or_by_number(name: str) -> None:
    docs, errors = parse_text(HEAD + f"  stop: {{signal: \"{name}\"}}\n", "a.yaml")
    assert errors == []
    assert signal_number(docs[0].manifest.spec.stop.signal) == {"SIGTERM": 15, "TERM": 15, "term": 15, "15": 15,
                                                                 "SIGHUP": 1, "INT": 2}[name]


def test_errors_in_two_documents_carry_their_own_lines() -> None:
    text = HEAD + "  replicas: 500\n---\n" + HEAD.replace("reviewer", "writer") + "  suspend: maybe\n"
    docs, errors = parse_text(text, "a.yaml")
    assert docs == []
    assert [(e.line, e.agent) for e in errors] == [(7, "reviewer"), (15, "writer")]


def test_valid_document_beside_an_invalid_one_is_still_returned() -> None:
    docs, errors = parse_text(HEAD + "  replicas: 500\n---\n" + HEAD.replace("reviewer", "writer"), "a.yaml")
    assert [d.manifest.metadata.name for d in docs] == ["writer"]
    assert [str(e) for e in errors] == ["a.yaml:7: spec.replicas: Input should be less than or equal to 100"]


def test_missing_required_top_level_field_points_at_the_document() -> None:
    err = only_error("\n\napiVersion: agentctl/v1\nmetadata: {name: a}\nspec: {command: [x]}\n")
    assert err.line == 3 and err.message == "kind: Field required"


def test_wrong_api_version_is_reported_at_its_line() -> None:
    err = only_error(HEAD.replace("agentctl/v1", "agentctl/v2"))
    assert err.line == 1 and err.message.startswith("apiVersion: ")


def test_duplicate_key_is_an_error_at_the_second_key() -> None:
    err = only_error(HEAD + "  replicas: 1\n  replicas: 2\n")
    assert (err.line, err.message) == (8, "duplicate key 'replicas'")


def test_yaml_syntax_error_names_the_line() -> None:
    err = only_error(HEAD + "  env: {A: 1\n  replicas: 2\n\n")
    assert err.message.startswith("YAML syntax error") and err.line in (8, 9)


def test_yaml_tab_indentation_error_names_the_line() -> None:
    err = only_error("apiVersion: agentctl/v1\nkind: Agent\n\tmetadata: {}\n")
    assert err.line == 3 and err.message.startswith("YAML syntax error")


@pytest.mark.parametrize("body", ["- a\n- b\n", "just a string\n", "42\n"])
def test_document_that_is_not_a_mapping_is_an_error(body: str) -> None:
    err = only_error("# leading comment\n" + body)
    assert err.line == 2 and "must be a mapping" in err.message


def test_empty_documents_are_skipped() -> None:
    docs, errors = parse_text("---\n---\n# nothing here\n---\n" + HEAD + "---\n", "a.yaml")
    assert errors == [] and [d.line for d in docs] == [5]


def test_empty_file_has_no_documents_and_no_errors() -> None:
    assert parse_text("", "a.yaml") == ([], [])


def test_yaml_merge_keys_fill_fields_and_explicit_keys_win() -> None:
    text = "apiVersion: agentctl/v1\nkind: Agent\nmetadata: {name: a}\nspec:\n" \
           "  <<: {command: [x], replicas: 2, suspend: true}\n  replicas: 3\n"
    docs, errors = parse_text(text, "a.yaml")
    assert errors == []
    spec = docs[0].manifest.spec
    assert (spec.command, spec.replicas, spec.suspend) == (["x"], 3, True)


# -- limits on hostile input ------------------------------------------------------------

def test_more_than_max_documents_is_an_error_and_stops_reading() -> None:
    chunk = "---\n" + HEAD  # 7 lines per document
    docs, errors = parse_text(chunk * (MAX_DOCUMENTS + 5), "a.yaml")
    assert len(docs) == MAX_DOCUMENTS
    first_line_of_the_extra_document = 7 * MAX_DOCUMENTS + 2
    assert [str(e) for e in errors] == [
        f"a.yaml:{first_line_of_the_extra_document}: more than {MAX_DOCUMENTS} documents in one file"]


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_billion_laughs_is_rejected_quickly() -> None:
    started = time.monotonic()
    err = only_error(BOMB)
    assert time.monotonic() - started < 5.0
    assert "alias bomb" in err.message and 1 <= err.line <= 9


def test_self_referencing_alias_is_rejected_quickly() -> None:
    started = time.monotonic()
    err = only_error("a: &a [*a, *a, *a]\n")
    assert time.monotonic() - started < 5.0 and err.line == 1


def test_nesting_deeper_than_max_depth_is_an_error() -> None:
    depth = MAX_DEPTH + 5
    err = only_error("spec: " + "[" * depth + "]" * depth + "\n")
    assert err.line == 1 and f"deeper than {MAX_DEPTH}" in err.message


def test_nesting_at_max_depth_minus_a_few_is_not_a_depth_error() -> None:
    depth = MAX_DEPTH - 3
    messages = errors_of("spec: " + "[" * depth + "]" * depth + "\n")
    assert not any("deeper" in m for m in messages)


def test_very_deep_nesting_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real CSafeLoader segfaults the whole process on this input, so the test uses the
    # pure-Python loader, which fails the same way but catchably.
    monkeypatch.setattr(manifests, "_loader_class", lambda: yaml.SafeLoader)
    depth = 700  # past the interpreter's recursion limit, cheap for the pure-Python scanner
    err = only_error("spec: " + "[" * depth + "]" * depth + "\n")
    assert f"deeper than {MAX_DEPTH}" in err.message


# -- JSON Schema ---------------------------------------------------------------------------

def test_json_schema_describes_the_manifest_and_forbids_unknown_fields() -> None:
    schema = json_schema()
    json.dumps(schema)  # serialisable as-is
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])
    assert set(schema["required"]) == {"apiVersion", "kind", "metadata", "spec"}
    assert schema["additionalProperties"] is False
    spec = schema["$defs"]["AgentSpec"]
    assert spec["additionalProperties"] is False
    assert {"command", "envFiles", "restartPolicy", "maxRestarts", "providerArgs"} <= set(spec["properties"])
    assert schema["$defs"]["Metadata"]["properties"]["name"]["pattern"] == manifests.NAME_RE
