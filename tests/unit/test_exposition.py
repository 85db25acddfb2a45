"""The hand-written text exposition against prometheus_client, the reference it replaced.

A scraper must not see a difference: for the same families (hostile label values and help
text, every kind of float) the bytes equal what prometheus_client's generate_latest writes,
and its own parser reads back the names, labels and values that were put in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from controller.exposition import Family, render

HOSTILE = st.text(alphabet=st.sampled_from('ab\\"\n\t {}=,é☃\x00#'), max_size=12) | st.text(max_size=8)
VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**18, 10**18)
ROWS = st.lists(st.tuples(HOSTILE, HOSTILE, VALUES), max_size=6)


class Reference:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def reference(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference(families))  # type: ignore[arg-type]
    return generate_latest(registry)


@settings(max_examples=200, deadline=None)
@given(rows=ROWS, help_text=HOSTILE, counter=st.booleans())
def test_labelled_families_are_byte_for_byte_what_prometheus_client_writes(
        rows: list[tuple[str, str, float]], help_text: str, counter: bool) -> None:
    # label names out of order: both write them sorted by name
    labels = ["zone", "agent"]
    ours = Family("agentctl_x", help_text, "counter" if counter else "gauge", labels)
    theirs = (CounterMetricFamily if counter else GaugeMetricFamily)("agentctl_x", help_text, labels=labels)
    for zone, agent, value in rows:
        ours.add([zone, agent], value)
        theirs.add_metric([zone, agent], value)
    assert render([ours]) == reference([theirs])


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(0, 10**6), min_size=1, max_size=5), total=VALUES)
def test_histograms_are_byte_for_byte_what_prometheus_client_writes(counts: list[int], total: float) -> None:
    bounds = [repr(0.001 * 10**i) for i in range(len(counts) - 1)] + ["+Inf"]
    buckets = [(b, sum(counts[:i + 1])) for i, b in enumerate(bounds)]
    ours = Family("agentctl_h_seconds", "Histogram.", "histogram")
    ours.add_histogram([], buckets, total)
    theirs = HistogramMetricFamily("agentctl_h_seconds", "Histogram.", buckets=buckets, sum_value=total)
    assert render([ours]) == reference([theirs])


@settings(max_examples=200, deadline=None)
@given(rows=ROWS)
def test_prometheus_client_parses_back_what_was_put_in(rows: list[tuple[str, str, float]]) -> None:
    family = Family("agentctl_y", "Help \\ with\nnewline.", "gauge", ["agent", "zone"])
    unique = {(a, z): v for a, z, v in rows}
    for (agent, zone), value in unique.items():
        family.add([agent, zone], value)
    parsed = list(text_string_to_metric_families(render([family]).decode()))
    assert [p.name for p in parsed] == ["agentctl_y"]
    assert parsed[0].documentation == "Help \\ with\nnewline."
    got = {(s.labels["agent"], s.labels["zone"]): s.value for s in parsed[0].samples}
    assert set(got) == set(unique)
    for key, value in unique.items():
        assert (math.isnan(got[key]) and math.isnan(float(value))) or got[key] == float(value)


def test_families_without_labels_and_a_counter_keep_their_total_suffix() -> None:
    text = render([Family("agentctl_errors", "Errors.", "counter", value=3),
                   Family("agentctl_depth", "Depth.", value=float("-inf"))]).decode()
    assert text == ("# HELP agentctl_errors_total Errors.\n# TYPE agentctl_errors_total counter\n"
                    "agentctl_errors_total 3.0\n"
                    "# HELP agentctl_depth Depth.\n# TYPE agentctl_depth gauge\nagentctl_depth -Inf\n")
