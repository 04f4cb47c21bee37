"""A time limit for a long asyncio scenario that says where it stalled.

pytest-timeout's dump of a stalled event loop shows only the loop polling its selector; the
coroutine that waits, and on what, is lost. `run_within` keeps each task's await chain from
the moment the limit passed and fails with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Coroutine


def run_within(scenario: Coroutine, seconds: float, cleanup_s: float = 30.0) -> None:
    """asyncio.run(scenario), failing once it has run `seconds` with every task's stack."""
    asyncio.run(_within(scenario, seconds, cleanup_s))


async def _within(scenario: Coroutine, seconds: float, cleanup_s: float) -> None:
    task = asyncio.ensure_future(scenario)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        task.result()
        return
    me = asyncio.current_task()
    stacks = "\n".join(_stack(t) for t in asyncio.all_tasks() if t is not me)
    task.cancel()
    with contextlib.suppress(BaseException):  # its own cleanup may be what stalls
        await asyncio.wait_for(task, cleanup_s)
    raise AssertionError(f"the scenario ran past {seconds:g} s; its tasks were at:\n{stacks}")


def _stack(task: asyncio.Task) -> str:
    out = io.StringIO()
    task.print_stack(file=out)
    return out.getvalue()
