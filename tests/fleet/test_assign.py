"""Properties of the leader's assignment (controller.fleet.assign), checked with hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.fleet.assign import UNLIMITED, HostInfo, Want, allows, assign

HOSTS = ["h0", "h1", "h2", "h3"]
LABELS = st.dictionaries(st.sampled_from(["gpu", "zone"]), st.sampled_from(["a", "b"]), max_size=2)

hosts_st = st.dictionaries(
    st.sampled_from(HOSTS),
    st.tuples(LABELS, st.one_of(st.just(UNLIMITED), st.integers(0, 4)), st.booleans()),
    max_size=4,
).map(lambda d: {n: HostInfo(n, labels, cap, cordoned) for n, (labels, cap, cordoned) in d.items()})


@st.composite
def wants_st(draw: st.DrawFn) -> list[Want]:
    out = []
    for a in range(draw(st.integers(0, 4))):
        hosts = draw(st.one_of(st.none(), st.lists(st.sampled_from(HOSTS), max_size=3).map(tuple)))
        labels = draw(st.one_of(st.none(), LABELS))
        for i in range(draw(st.integers(0, 4))):
            out.append(Want(f"a{a}-{i}", f"a{a}", i, hosts, labels))
    return out


current_st = st.dictionaries(st.sampled_from([f"a{a}-{i}" for a in range(4) for i in range(4)]),
                             st.sampled_from(HOSTS + ["gone"]), max_size=16)


@settings(max_examples=400, deadline=None)
@given(wants_st(), hosts_st, current_st)
def test_every_assignment_is_a_wanted_instance_on_an_allowed_live_host(wants: list[Want], hosts: dict[str, HostInfo],
                                                                       current: dict[str, str]) -> None:
    by_id = {w.instance: w for w in wants}
    result = assign(wants, hosts, current)
    for instance, host in result.items():
        assert instance in by_id
        assert host in hosts and not hosts[host].cordoned
        assert allows(by_id[instance], hosts[host])


@settings(max_examples=400, deadline=None)
@given(wants_st(), hosts_st, current_st)
def test_no_host_gets_more_instances_than_its_capacity(wants: list[Want], hosts: dict[str, HostInfo],
                                                       current: dict[str, str]) -> None:
    result = assign(wants, hosts, current)
    for name, info in hosts.items():
        assert sum(1 for h in result.values() if h == name) <= info.capacity


@settings(max_examples=400, deadline=None)
@given(wants_st(), hosts_st, current_st)
def test_an_instance_waits_only_when_every_allowed_host_is_full(wants: list[Want], hosts: dict[str, HostInfo],
                                                                current: dict[str, str]) -> None:
    result = assign(wants, hosts, current)
    for w in wants:
        if w.instance in result:
            continue
        for h in hosts.values():
            if not h.cordoned and allows(w, h):
                assert sum(1 for x in result.values() if x == h.name) >= h.capacity


@settings(max_examples=400, deadline=None)
@given(wants_st(), hosts_st, current_st)
def test_nothing_moves_when_nothing_changes(wants: list[Want], hosts: dict[str, HostInfo],
                                            current: dict[str, str]) -> None:
    once = assign(wants, hosts, current)
    assert assign(wants, hosts, once) == once


@settings(max_examples=400, deadline=None)
@given(wants_st(), hosts_st, current_st)
def test_a_valid_assignment_is_kept(wants: list[Want], hosts: dict[str, HostInfo], current: dict[str, str]) -> None:
    """An instance on a live, allowed, uncordoned host that is within capacity never moves
    (a host over capacity sheds its highest instances; none of them is asserted here)."""
    result = assign(wants, hosts, current)
    for w in wants:
        host = hosts.get(current.get(w.instance, ""))
        if host is None or host.cordoned or not allows(w, host):
            continue
        kept_before = [x for x in wants if current.get(x.instance) == host.name and allows(x, host)]
        if len(kept_before) <= host.capacity:
            assert result.get(w.instance) == host.name


def test_new_instances_go_to_the_host_with_most_free_capacity() -> None:
    hosts = {"a": HostInfo("a", capacity=4), "b": HostInfo("b", capacity=2)}
    wants = [Want(f"x-{i}", "x", i) for i in range(4)]
    result = assign(wants, hosts, {})
    assert sorted(result.values()) == ["a", "a", "a", "b"]  # free 4,2 -> 3,2 -> 2,2 -> 1,2


def test_a_cordoned_host_keeps_nothing() -> None:
    hosts = {"a": HostInfo("a", cordoned=True), "b": HostInfo("b")}
    assert assign([Want("x-0", "x", 0)], hosts, {"x-0": "a"}) == {"x-0": "b"}
