"""The daemon worker threads that run blocking Mooncake calls (no Mooncake needed: plain Python jobs)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from kvpipe.connectors.mooncake import _DaemonWorkers, _in_daemon_thread


def _wait_for(cond: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def test_an_idle_worker_takes_the_next_call() -> None:
    w = _DaemonWorkers(idle_secs=30)
    seen: list[int] = []
    done = threading.Event()
    w.submit(lambda: (seen.append(threading.get_ident()), done.set()))
    assert done.wait(5)
    assert _wait_for(lambda: w.idle == 1)
    done.clear()
    w.submit(lambda: (seen.append(threading.get_ident()), done.set()))
    assert done.wait(5)
    assert seen[0] == seen[1]  # the same thread, not a new one


def test_a_busy_worker_is_never_handed_a_call() -> None:
    # A call stuck in the first worker must not hold up the next one (it gets a thread of its own).
    w = _DaemonWorkers(idle_secs=30)
    release, second = threading.Event(), threading.Event()
    w.submit(lambda: release.wait(10))
    w.submit(second.set)
    try:
        assert second.wait(5)
    finally:
        release.set()
    assert _wait_for(lambda: w.idle == 2)


def test_idle_workers_exit() -> None:
    w = _DaemonWorkers(idle_secs=0.05)
    before = threading.active_count()
    done = threading.Event()
    w.submit(done.set)
    assert done.wait(5)
    assert _wait_for(lambda: w.idle == 0 and threading.active_count() <= before)


def test_calls_keep_being_served_while_workers_come_and_go() -> None:
    # Idle timeouts racing with new calls: no call is ever lost.
    w = _DaemonWorkers(idle_secs=0.001)
    n = 300
    count = 0
    lock = threading.Lock()
    all_done = threading.Event()

    def job() -> None:
        nonlocal count
        with lock:
            count += 1
            if count == n:
                all_done.set()

    for i in range(n):
        w.submit(job)
        if i % 7 == 0:
            time.sleep(0.002)  # let workers time out now and then
    assert all_done.wait(10)


async def test_in_daemon_thread_returns_values_and_raises_errors() -> None:
    assert await _in_daemon_thread(lambda: 41 + 1) == 42

    def boom() -> None:
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        await _in_daemon_thread(boom)


async def test_an_abandoned_call_runs_on_and_its_worker_is_reused() -> None:
    release, finished = threading.Event(), threading.Event()

    def slow() -> None:
        release.wait(10)
        finished.set()

    with anyio.move_on_after(0.05) as scope:
        await _in_daemon_thread(slow)
    assert scope.cancelled_caught
    release.set()
    assert await anyio.to_thread.run_sync(finished.wait, 5)
    assert await _in_daemon_thread(lambda: "next") == "next"


def test_a_forked_child_starts_its_own_workers() -> None:
    # The parent's idle workers do not exist in a forked child: a call there must get a thread of the child's.
    import multiprocessing

    from kvpipe.connectors import mooncake

    done = threading.Event()
    mooncake._WORKERS.submit(done.set)
    assert done.wait(5)
    assert _wait_for(lambda: mooncake._WORKERS.idle >= 1)
    ctx = multiprocessing.get_context("fork")
    q = ctx.SimpleQueue()
    p = ctx.Process(target=_child_runs_a_call, args=(q,))
    p.start()
    p.join(20)
    assert p.exitcode == 0
    assert q.get() == "ran"


def _child_runs_a_call(q: object) -> None:
    from kvpipe.connectors import mooncake

    assert mooncake._WORKERS.idle == 0  # the parent's idle workers were forgotten
    ran = threading.Event()
    mooncake._WORKERS.submit(ran.set)
    q.put("ran" if ran.wait(5) else "stuck")  # type: ignore[attr-defined]
