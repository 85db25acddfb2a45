"""The Prometheus text exposition format 0.0.4, written by hand for the controller's own series.

Logic layer, pure (no I/O, no clock). `controller.metrics` builds `Family` values and calls
`render`; the HTTP listener serves the bytes with `CONTENT_TYPE`. It must stay byte-compatible
with what prometheus_client's `generate_latest` writes for the same families (tests compare
both), but must not import prometheus_client: that package costs the controller ~3 MiB of
resident memory (its exposition module pulls in http.server, urllib.request and ssl), and its
generic formatter is most of a scrape's time at 1000 agents.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
INF = float("inf")


_COMMON = {0: "0.0", 1: "1.0"}  # most samples are one-hot flags and zero counters


def float_to_go(value: float) -> str:
    """A sample value as Go (and prometheus_client's floatToGoString) writes it."""
    if type(value) is int and value in _COMMON:  # ints only: the common case, without float()/repr()
        return _COMMON[value]
    d = float(value)
    if d == INF:
        return "+Inf"
    if d == -INF:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to an exponent sooner than Python does
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def escape_label(value: str) -> str:
    if "\\" not in value and "\n" not in value and '"' not in value:
        return value  # the usual case: agent names, phases
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


class Family:
    """One metric family: its HELP/TYPE header and its sample lines, rendered as they are added.

    Label names are fixed per family and written sorted by name, as prometheus_client does;
    `kind` is "gauge", "counter" (samples get `_total`) or "histogram".
    """

    __slots__ = ("name", "help", "kind", "_pairs", "_sample", "lines")

    def __init__(self, name: str, help: str, kind: str = "gauge", labels: Sequence[str] = (),  # noqa: A002
                 value: float | None = None) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        # (label name, position of its value), in the sorted-by-name order of the output
        self._pairs = sorted(((label, i) for i, label in enumerate(labels)), key=lambda p: p[0])
        self._sample = name + "_total" if kind == "counter" else name
        self.lines: list[str] = []
        if value is not None:
            self.add([], value)

    @property
    def samples(self) -> list[str]:
        return self.lines

    def _labelstr(self, values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
        pairs = [(k, values[i]) for k, i in self._pairs]
        if extra is not None:
            pairs.append(extra)
            pairs.sort(key=lambda p: p[0])
        if not pairs:
            return ""
        return "{" + ",".join([f'{k}="{escape_label(v)}"' for k, v in pairs]) + "}"

    def line(self, values: Sequence[str], value: float) -> str:
        """One sample line, not added: callers cache what changes rarely and `extend` with it."""
        return f"{self._sample}{self._labelstr(values)} {float_to_go(value)}\n"

    def add(self, values: Sequence[str], value: float) -> None:
        self.lines.append(self.line(values, value))

    def extend(self, text: str) -> None:
        """Sample lines rendered earlier by `line` of a family of the same name and labels."""
        if text:
            self.lines.append(text)

    def add_histogram(self, values: Sequence[str], buckets: Sequence[tuple[str, float]], sum_value: float) -> None:
        """Cumulative buckets, +Inf last (its count is the _count), then _count and _sum."""
        for le, count in buckets:
            self.lines.append(f"{self.name}_bucket{self._labelstr(values, ('le', le))} {float_to_go(count)}\n")
        plain = self._labelstr(values)
        if float(buckets[0][0]) >= 0:
            self.lines.append(f"{self.name}_count{plain} {float_to_go(buckets[-1][1])}\n")
            self.lines.append(f"{self.name}_sum{plain} {float_to_go(sum_value)}\n")

    def text(self) -> str:
        shown = self.name + "_total" if self.kind == "counter" else self.name
        return f"# HELP {shown} {escape_help(self.help)}\n# TYPE {shown} {self.kind}\n" + "".join(self.lines)


def render(families: Iterable[Family]) -> bytes:
    return "".join(f.text() for f in families).encode("utf-8")
