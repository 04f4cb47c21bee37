"""Real servers for the client tests (tiny preset, CPU), both started at once to share the
warm-up wait: `server` streams (API key, 3 chunks per shot, fault injection), and
`limits_server` admits one session (one per client) to produce 429 and 503 refusals."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.server import ServerProcess

API_KEY = "client-tests-key"


@pytest.fixture(scope="session")
def _servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("servers")
    main = ServerProcess(
        tmp,
        chunks_per_shot=3,
        max_sessions=4,
        max_sessions_per_client=8,
        realtime_margin=50,
        session_grace_s=5,
        fault_injection=True,
        api_key=API_KEY,
    )
    limits = ServerProcess(tmp, max_sessions=1, max_sessions_per_client=1, session_grace_s=2)
    yield main, limits
    for srv in (main, limits):
        assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="session")
def server(_servers) -> ServerProcess:
    return _servers[0].wait_ready()


@pytest.fixture(scope="session")
def limits_server(_servers) -> ServerProcess:
    return _servers[1].wait_ready()


def run(coro):
    """Run one test coroutine with a bound, so a hung stream fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, 120))
