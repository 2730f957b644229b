"""IdleWatch, the processes pool's idle timeout: one thread, re-armed without a new one."""

from __future__ import annotations

import threading
import time

import pytest

from parfor_core._idle import IdleWatch


def _watch(timeout: float) -> tuple[IdleWatch, threading.Event]:
    fired = threading.Event()
    return IdleWatch(timeout, fired.set), fired


def test_it_fires_once_the_timeout_has_passed_since_it_was_armed():
    watch, fired = _watch(0.2)
    start = time.monotonic()
    watch.arm()
    assert fired.wait(10)
    assert time.monotonic() - start >= 0.2
    watch.close()


def test_disarming_it_keeps_it_from_firing():
    watch, fired = _watch(0.2)
    watch.arm()
    watch.disarm()
    assert not fired.wait(0.6)
    watch.close()


def test_arming_it_again_moves_the_deadline_and_starts_no_thread():
    watch, fired = _watch(0.4)
    watch.arm()
    thread = watch._thread
    start = time.monotonic()
    for _ in range(3):
        time.sleep(0.2)
        watch.disarm()
        watch.arm()  # each idle spell starts the timeout afresh
        # The watch's own thread, not the process's thread count: other tests' pools (Ray,
        # Dask) start and end threads of their own meanwhile.
        assert watch._thread is thread and thread.is_alive()
    assert fired.wait(10)
    assert time.monotonic() - start >= 0.6 + 0.4
    watch.close()


def test_it_wakes_from_a_wait_without_deadline_when_armed_again():
    watch, fired = _watch(0.1)
    watch.arm()
    assert fired.wait(10)  # its thread now waits for the next arm
    fired.clear()
    watch.arm()
    assert fired.wait(10)
    watch.close()


def test_closing_it_ends_its_thread_and_it_can_be_armed_after():
    watch, fired = _watch(30)
    watch.arm()
    thread = watch._thread
    assert thread is not None and thread.is_alive()
    watch.close()
    thread.join(10)
    assert not thread.is_alive() and not fired.is_set()
    watch.timeout = 0.1
    watch.arm()
    assert fired.wait(10)
    watch.close()


def test_it_says_whether_it_is_armed():
    watch, fired = _watch(30)
    assert not watch.armed
    watch.arm()
    assert watch.armed
    watch.disarm()
    assert not watch.armed
    watch.close()


def test_an_endless_timeout_never_fires():
    watch, fired = _watch(float("inf"))
    watch.arm()
    assert not fired.wait(0.5)
    assert watch._thread is not None and watch._thread.is_alive()
    watch.close()


def test_a_failing_action_is_reported_and_the_watch_goes_on():
    calls: list[int] = []

    def fail_first() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("no such worker")

    watch = IdleWatch(0.1, fail_first)
    with pytest.warns(RuntimeWarning, match="no such worker"):
        watch.arm()
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
    watch.arm()
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) == 2
    watch.close()
