"""A real server shared by the fault and hostile-input tests (one warm-up for both)."""

from __future__ import annotations

import pytest

from tests.support.server import ServerProcess

API_KEY = "edge-tests-key"
ORIGIN = "https://app.example"


@pytest.fixture(scope="session")
def edge_server(tmp_path_factory):
    """API key and CORS on; lead_chunks=50: generation runs as fast as the CPU allows, so
    only the outbox bound (outbox_chunks, 4) holds a session back, and with a 32 KiB socket
    send buffer (not the kernel's autotuned MiBs) a stuck reader reaches it in seconds."""
    srv = ServerProcess(
        tmp_path_factory.mktemp("edge"),
        max_sessions=4,
        realtime_margin=50,
        chunks_per_shot=3,
        max_sessions_per_client=8,
        session_grace_s=20,
        lead_chunks=50,
        drain_grace_s=1,
        stream_send_buffer_bytes=32768,
        api_key=API_KEY,
        cors_origins=ORIGIN,
        ws_message_rate=200,  # the prompt flood here tests the prompt limit, not the message one
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert "Exception in ASGI application" not in srv.log()
