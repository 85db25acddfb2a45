"""Label selectors as `agentctl get -l` parses them: kubectl's equality syntax."""

from __future__ import annotations

import pytest

from controller.selectors import SelectorError, parse

INFRA = {"team": "infra", "tier": "gpu"}
ML = {"team": "ml"}
NONE: dict[str, str] = {}


@pytest.mark.parametrize(("text", "selected"), [
    ("team=infra", [True, False, False]),
    ("team==infra", [True, False, False]),
    ("team!=infra", [False, True, True]),  # k!=v also selects agents without k, as kubectl does
    ("team", [True, True, False]),
    ("!team", [False, False, True]),
    ("team,!tier", [False, True, False]),
    ("team=infra,tier=gpu", [True, False, False]),
    (" team = infra , tier ", [True, False, False]),
    ("", [True, True, True]),
])
def test_selector_matches_like_kubectl(text: str, selected: list[bool]) -> None:
    sel = parse(text)
    assert [sel.matches(labels) for labels in (INFRA, ML, NONE)] == selected


@pytest.mark.parametrize("text", ["team=infra,,tier", "team=in fra", "=infra", "team in (a,b)", "!", "a=b,"])
def test_bad_selector_is_an_error_naming_the_term(text: str) -> None:
    with pytest.raises(SelectorError):
        parse(text)
