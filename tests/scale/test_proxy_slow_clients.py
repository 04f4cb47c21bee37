"""The shipped nginx template on loopback against slow clients: a connection that sends
nothing, or a request it never finishes, is closed by nginx itself (its request deadlines,
no later than a replica's `http_request_timeout_s`), and nginx answers others meanwhile."""

from __future__ import annotations

import re
import socket

import httpx

from server.settings import Settings
from tests.server.test_connections import closed_by_server
from tests.support.proxy import TEMPLATE, Names, Nginx, dns


def seconds(directive: str) -> float:
    (value,) = re.findall(rf"^\s*{directive}\s+(\d+)s;", TEMPLATE.read_text(), re.MULTILINE)
    return float(value)


def test_nginx_gives_up_on_a_slow_client_no_later_than_a_replica():
    replica = Settings().http_request_timeout_s
    assert seconds("client_header_timeout") <= replica
    assert seconds("client_body_timeout") <= replica


def test_nginx_closes_connections_that_never_finish_a_request(tmp_path):
    """Before: nginx's defaults held them 60 s (past this test's hang guard)."""
    with dns(Names()) as dns_port:
        proxy = Nginx(tmp_path, dns_port, backend_port=9).wait_up()
        socks = []
        try:
            for head in (
                b"",
                b"GET /v1/mod",
                b"GET / HTTP/1.1\r\nHost: x\r\n",
                b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\ncontent-length: 9\r\n\r\n{",
            ):
                s = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
                s.sendall(head)
                socks.append(s)
            assert httpx.get(proxy.base + "/proxy/healthz", timeout=10).status_code == 200
            closed = closed_by_server(
                socks, len(socks), guard_s=3 * seconds("client_header_timeout")
            )
            assert closed == set(range(len(socks)))
        finally:
            for s in socks:
                s.close()
            proxy.stop()
