"""A task cancelled just as its bounded await completes still ends.

Python 3.11's asyncio.wait_for returns the result of an operation that completed as the
waiting task was cancelled and drops the cancellation: a stream sender or reader cancelled
at that moment would go on (a leaked task, and whoever awaits it waits forever; seen as a
scale-out test that hung for five minutes closing a stream reader). The serving code and the
client bound their awaits with asyncio.timeout instead."""

from __future__ import annotations

import ast
import asyncio

from server.api.stream import _bounded
from tests.support.sources import package_sources


def _cancelled_as_an_item_arrives(bounded) -> bool:
    """Whether a loop of bounded queue reads ends when cancelled as an item arrives."""

    async def go() -> bool:
        q: asyncio.Queue[int] = asyncio.Queue()

        async def reader() -> None:
            while True:
                await bounded(q.get(), 10)

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.01)  # the reader waits on the queue
        q.put_nowait(1)  # its get completes ...
        task.cancel()  # ... and it is cancelled, before it runs again
        await asyncio.sleep(0.1)
        ended = task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return ended

    return asyncio.run(go())


def test_a_bounded_send_cancelled_as_it_completes_ends_its_task():
    assert _cancelled_as_an_item_arrives(_bounded)


def test_the_serving_code_and_the_client_never_bound_an_await_with_wait_for():
    calls = []
    for path, source in package_sources(("server", "clients", "model", "cache")).items():
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "wait_for"
                and isinstance(node.value, ast.Name)
                and node.value.id == "asyncio"
            ):
                calls.append(f"{path}:{node.lineno}")
    assert calls == []
