"""`get -o json` from the writer's JSON mirror prints exactly what parsing the YAML status files
prints, and a mirror that does not match its YAML file's bytes is never believed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.status import StatusWriter, items_json, mirror_dir, read_all, read_all_json, render
from tests.unit.test_status import at, status_input

TEXT = st.text(alphabet=st.sampled_from('ab"\\\n\t é☃\u2028{}[]:,'), max_size=8)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                       max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(docs=st.lists(st.dictionaries(TEXT, JSONISH, max_size=4), max_size=4))
def test_items_json_is_json_dumps_of_the_items(docs: list[dict[str, Any]]) -> None:
    assert items_json([json.dumps(d, indent=2) for d in docs]) == json.dumps({"items": docs}, indent=2)


def docs_for(names: list[str], hostile: str = "") -> dict[str, dict[str, Any]]:
    out = {}
    for i, name in enumerate(names):
        doc = render(status_input(name=name, restarts=i), at(i), None)
        doc["lastError"] = f"exit {i}: {hostile}"
        out[name] = doc
    return out


def test_mirror_reads_as_the_yaml_files_do(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "status"
    writer = StatusWriter(directory, mirror=True)
    # a lone surrogate makes the YAML writer escape: the mirror must hold what the YAML holds
    docs = docs_for(["alpha", "beta", "gamma"], hostile='quote " newline \n unicode é \udcff')
    for name, doc in docs.items():
        writer.write(name, doc)
    writer.flush()
    read = read_all_json(directory)
    assert [d for d, _ in read] == read_all(directory)
    assert all(text is not None for _, text in read)  # every one from the mirror
    assert [text for _, text in read] == [json.dumps(d, indent=2) for d in read_all(directory)]


def test_a_mirror_that_no_longer_matches_its_yaml_is_ignored(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "status"
    writer = StatusWriter(directory, mirror=True)
    for name, doc in docs_for(["alpha", "beta"]).items():
        writer.write(name, doc)
    writer.flush()
    # the YAML changes without its mirror (an older controller, or a crash between the two writes)
    other = StatusWriter(directory)
    changed = dict(writer.docs["beta"], phase="BackOff")
    other.write("beta", changed)
    other.flush()
    read = dict((d["name"], (d, text)) for d, text in read_all_json(directory))
    assert read["beta"] == (read_all(directory)[1], None) and read["beta"][0]["phase"] == "BackOff"
    assert read["alpha"][1] is not None
    writer.remove("alpha")
    writer.flush()
    assert not (mirror_dir(directory) / "alpha.json").exists()
    assert [d["name"] for d, _ in read_all_json(directory)] == ["beta"]
