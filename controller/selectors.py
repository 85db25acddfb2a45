"""Label selectors with kubectl's equality syntax: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = and.
Pure: `agentctl get -l` parses once, then matches label dicts; knows nothing of agents."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_KEY = re.compile(r"^([a-z0-9A-Z]([-a-z0-9A-Z_./]*[a-z0-9A-Z])?)$")
_VALUE = re.compile(r"^([a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?)?$")


class SelectorError(ValueError):
    """A selector that cannot be parsed; the message names the offending term."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        # kubectl: k!=v also selects objects without the key
        return labels.get(self.key) != self.value


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def _key(text: str, term: str) -> str:
    key = text.strip()
    if not _KEY.match(key):
        raise SelectorError(f"invalid label key {key!r} in selector term {term!r}")
    return key


def _value(text: str, term: str) -> str:
    value = text.strip()
    if not _VALUE.match(value):
        raise SelectorError(f"invalid label value {value!r} in selector term {term!r}")
    return value


def _term(term: str) -> Requirement:
    stripped = term.strip()
    if not stripped:
        raise SelectorError("empty term in selector (two commas, or a comma at an end)")
    if "!=" in stripped:
        key, value = stripped.split("!=", 1)
        return Requirement(_key(key, term), "!=", _value(value, term))
    if "==" in stripped:
        key, value = stripped.split("==", 1)
        return Requirement(_key(key, term), "=", _value(value, term))
    if "=" in stripped:
        key, value = stripped.split("=", 1)
        return Requirement(_key(key, term), "=", _value(value, term))
    if stripped.startswith("!"):
        return Requirement(_key(stripped[1:], term), "!exists")
    return Requirement(_key(stripped, term), "exists")


def parse(text: str) -> Selector:
    """`team=infra,tier!=gpu,canary,!legacy` -> a Selector. Set syntax (`in`, `notin`) is not supported."""
    if not text.strip():
        return Selector()  # kubectl: an empty selector selects everything
    if " in " in f" {text} " or "notin" in text or "(" in text:
        raise SelectorError(f"set-based selectors are not supported: {text!r} (use k=v, k!=v, k, !k)")
    return Selector(tuple(_term(t) for t in text.split(",")))
