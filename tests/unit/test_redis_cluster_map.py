"""``ClusterMap``: how long a failed cluster master is left out (1 s when refused; 5 s doubling to 60 s while it
keeps hanging; an answer ends the streak), when every master counts as down, and what a new map forgets."""

from __future__ import annotations

import pytest

from kvpipe.connectors import redis_cluster
from kvpipe.connectors.redis_cluster import HUNG_DOWN_MAX_S, HUNG_DOWN_S, NODE_DOWN_S, ClusterMap, NodeHung
from kvpipe.connectors.redis_url import Addr
from kvpipe.errors import TierUnavailable

A, B = Addr("10.0.0.1", 7000), Addr("10.0.0.2", 7001)


class _Hung(TierUnavailable, NodeHung):
    pass


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(redis_cluster.time, "monotonic", c)
    return c


def _map() -> ClusterMap:
    m = ClusterMap("redis-cluster://x")
    m.install([A] * 8192 + [B] * 8192, [()] * 16384)
    return m


def _down_for(m: ClusterMap, clock: _Clock, addr: Addr) -> float:
    """How long ``addr`` stays left out from now (probing in 0.25 s steps, then restoring the clock)."""
    start = clock.t
    while m.is_down(addr):
        clock.t += 0.25
    out, clock.t = clock.t - start, start
    return out


def test_refused_master_is_left_out_for_a_second(clock: _Clock) -> None:
    m = _map()
    m.failed(A, ConnectionRefusedError("refused"))
    assert m.is_down(A) and not m.is_down(B)
    assert _down_for(m, clock, A) == pytest.approx(NODE_DOWN_S, abs=0.25)
    m.failed(A, ConnectionRefusedError("refused"))  # refusals do not lengthen it: retrying costs nothing
    assert _down_for(m, clock, A) == pytest.approx(NODE_DOWN_S, abs=0.25)


def test_hung_master_is_left_out_longer_doubling_until_it_answers(clock: _Clock) -> None:
    m = _map()
    periods = []
    for _ in range(6):
        m.failed(A, _Hung("no answer within 1 s"))
        periods.append(_down_for(m, clock, A))
    expect = [min(HUNG_DOWN_S * 2**i, HUNG_DOWN_MAX_S) for i in range(6)]
    assert periods == pytest.approx(expect, abs=0.25)
    m.answered(A)  # the streak ends
    m.failed(A, _Hung("no answer within 1 s"))
    assert _down_for(m, clock, A) == pytest.approx(HUNG_DOWN_S, abs=0.25)


def test_all_down_needs_every_master(clock: _Clock) -> None:
    m = _map()
    m.failed(A, ConnectionRefusedError("refused"))
    assert not m.all_down()
    m.failed(B, _Hung("no answer"))
    assert m.all_down()
    assert m.masters == frozenset({A, B})


def test_a_new_map_forgets_masters_that_are_no_longer_masters(clock: _Clock) -> None:
    m = _map()
    m.failed(A, _Hung("no answer"))
    m.failed(A, _Hung("no answer"))
    c = Addr("10.0.0.3", 7002)  # A's replica took over
    m.install([c] * 8192 + [B] * 8192, [()] * 16384)
    assert not m.is_down(A) and m.masters == frozenset({B, c})
    # A rejoins later as a master: its old hang streak is gone
    m.install([A] * 8192 + [B] * 8192, [()] * 16384)
    m.failed(A, _Hung("no answer"))
    assert _down_for(m, clock, A) == pytest.approx(HUNG_DOWN_S, abs=0.25)
