"""The test suite's time limit for asyncio scenarios (tests/support/watchdog.py)."""

import asyncio

import pytest

from tests.support.watchdog import run_within


def test_a_stalled_scenario_fails_with_the_await_it_stalled_on():
    async def waits_for_an_event_nobody_sets():
        await asyncio.Event().wait()

    with pytest.raises(AssertionError) as failed:
        run_within(waits_for_an_event_nobody_sets(), 0.2)
    assert "ran past 0.2 s" in str(failed.value)
    assert "waits_for_an_event_nobody_sets" in str(failed.value)
    assert "await asyncio.Event().wait()" in str(failed.value)


def test_a_scenario_within_its_time_ends_as_it_would_alone():
    async def fine():
        await asyncio.sleep(0)

    async def broken():
        raise ValueError("its own failure")

    run_within(fine(), 5)
    with pytest.raises(ValueError, match="its own failure"):
        run_within(broken(), 5)
