"""Bad input gets the documented error or close code, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from tests.support.server import ServerProcess, StreamClient


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("srv"),
        max_sessions=6,
        realtime_margin=50,
        abuse_limit=4,
        max_sessions_per_client=6,
        session_grace_s=3,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0


def run(coro):
    return asyncio.run(coro)


def auth(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "frame, code",
    [
        ("{not json", "bad_json"),
        (json.dumps({"type": "teleport"}), "unknown_type"),
        (json.dumps({"type": "prompt", "prompt": 42}), "bad_message"),
        (json.dumps([1, 2, 3]), "bad_message"),
        (json.dumps({"type": "prompt", "prompt": "x" * 70_000}), "message_too_large"),
        (json.dumps({"type": "prompt", "prompt": "x" * 8001}), "prompt_too_long"),
        (b"\x00\x01binary", "binary_not_allowed"),
        (json.dumps({"type": "resume"}), "invalid_state"),
    ],
    ids=[
        "malformed",
        "unknown-type",
        "wrong-type",
        "not-object",
        "oversized",
        "prompt-limit",
        "binary",
        "resume-not-paused",
    ],
)
def test_bad_message_gets_an_error_and_the_stream_goes_on(server, frame, code):
    d = server.create(seed=1)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.until(lambda m: m["type"] == "init")
            await c.send(frame)
            err = await c.until(lambda m: m["type"] == "error")
            await c.chunks(1)  # the stream goes on
            await c.send({"type": "ping"})
            pong = await c.until(lambda m: m["type"] == "pong")
            await c.send({"type": "stop"})
            await c.closed()
            return err, pong

    err, pong = run(go())
    assert err["code"] == code and err["fatal"] is False and err["message"]
    assert pong["server_time"] > 0
    if code == "prompt_too_long":
        assert "8000" in err["message"]


def test_repeated_abuse_closes_the_connection_not_the_server(server):
    d = server.create(seed=2)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            for _ in range(4):
                await c.send("garbage")
            return await c.closed()

    st = run(go())
    assert st.close_code == 4400
    assert st.of("error")[-1]["code"] == "too_many_errors" and st.of("error")[-1]["fatal"]
    assert httpx.get(server.base + "/readyz").status_code == 200


@pytest.mark.parametrize(
    "suffix, token, close, code",
    [
        ("", None, 4001, "unauthorized"),
        ("", "wrong-token", 4004, "unknown_session"),
        ("nope", "whatever", 4004, "unknown_session"),
    ],
    ids=["missing-token", "wrong-token", "unknown-session"],
)
def test_stream_auth(server, suffix, token, close, code):
    d = server.create(seed=3)
    url = d["stream_url"].replace(d["session_id"], d["session_id"] + suffix)

    async def go():
        async with StreamClient(url, token) as c:
            return await c.closed()

    st = run(go())
    assert st.close_code == close and st.of("error")[0]["code"] == code
    assert not st.chunks


def test_a_newer_stream_connection_takes_over_and_the_old_one_is_told(server):
    """The newer connection wins at once (a client resuming after its socket died must not
    wait for the server to notice): the old one gets a fatal `replaced` error and close
    4010 (do not reconnect), the new one streams on from where it says it is."""
    d = server.create(seed=4)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c1:
            got = await c1.chunks(1)
            last = got[-1].message["seq"]
            url = f"{d['stream_url']}?token={d['token']}&last_seq={last}"
            async with StreamClient(url, None) as c2:
                hello = await c2.until(lambda m: m["type"] == "hello")
                st1 = await c1.closed()
                nxt = await c2.chunks(1)
                await c2.send({"type": "stop"})
                await c2.closed()
            return last, hello, st1, nxt

    last, hello, st1, nxt = run(go())
    assert st1.close_code == 4010 and st1.of("error")[-1]["code"] == "replaced"
    assert st1.of("error")[-1]["fatal"]
    assert hello["next_seq"] == last + 1 == nxt[0].message["seq"]


def test_token_from_header_works_and_another_sessions_token_does_not(server):
    a, b = server.create(seed=5), server.create(seed=6)
    base = f"{server.base}/v1/sessions"
    assert httpx.get(f"{base}/{a['session_id']}", headers=auth(a["token"])).status_code == 200
    r = httpx.get(f"{base}/{a['session_id']}", headers=auth(b["token"]))
    assert r.status_code == 404 and r.json()["code"] == "unknown_session"
    r = httpx.get(f"{base}/{a['session_id']}")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    r = httpx.get(f"{base}/{a['session_id']}", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401

    async def go():
        ws = await websockets.connect(a["stream_url"], additional_headers=auth(a["token"]))
        hello = json.loads(await ws.recv())
        await ws.close()
        return hello

    assert run(go())["type"] == "hello"
    for d in (a, b):
        httpx.delete(f"{base}/{d['session_id']}", headers=auth(d["token"]))


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "   "}, 422, "prompt"),
        ({"prompt": "x" * 8001}, 422, "8000"),
        ({"prompt": "ok", "shots": ["a"] * 17}, 422, "16"),
        ({"prompt": "ok", "seed": "12"}, 422, "seed"),
        ({"prompt": "ok", "mode": "sideways"}, 422, "mode"),
        ({"shots": ["a"]}, 422, "prompt"),
    ],
    ids=["empty", "blank", "too-long", "too-many-shots", "seed-type", "mode", "missing"],
)
def test_create_validation(server, body, status, needle):
    r = httpx.post(server.base + "/v1/sessions", json=body)
    assert r.status_code == status and needle in r.json()["detail"]


def test_malformed_and_oversized_bodies(server):
    r = httpx.post(
        server.base + "/v1/sessions", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"]
    r = httpx.post(
        server.base + "/v1/sessions",
        content=b"x" * 300_000,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413
    d = server.create(seed=7)
    r = httpx.post(
        f"{server.base}/v1/sessions/{d['session_id']}/prompts",
        json={"prompt": "y" * 9000},
        headers=auth(d["token"]),
    )
    assert (
        r.status_code == 422
        and r.json()["code"] == "prompt_too_long"
        and "8000" in r.json()["detail"]
    )
    r = httpx.post(
        f"{server.base}/v1/sessions/{d['session_id']}/prompts",
        json={"prompt": "ok", "mode": 3},
        headers=auth(d["token"]),
    )
    assert r.status_code == 422
    httpx.delete(f"{server.base}/v1/sessions/{d['session_id']}", headers=auth(d["token"]))
    assert httpx.get(server.base + "/readyz").status_code == 200


def test_openapi_documents_the_rest_half(server):
    doc = httpx.get(server.base + "/openapi.json").json()
    assert {
        "/v1/sessions",
        "/v1/sessions/{sid}",
        "/v1/sessions/{sid}/prompts",
        "/v1/models",
    } <= set(doc["paths"])
    assert "CreateSessionRequest" in doc["components"]["schemas"]


def test_admission_refuses_with_retry_after(tmp_path):
    srv = ServerProcess(tmp_path, max_sessions=1, max_sessions_per_client=1).wait_ready()
    try:
        d = srv.create(seed=1)
        r = httpx.post(srv.base + "/v1/sessions", json={"prompt": "second"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["code"] == "rate_limited"
        # another client (by API key or address) hits the capacity limit instead
        r = httpx.post(
            srv.base + "/v1/sessions",
            json={"prompt": "third"},
            headers={"X-Forwarded-For": "1.2.3.4"},
        )
        assert r.status_code in (429, 503)
        httpx.delete(f"{srv.base}/v1/sessions/{d['session_id']}", headers=auth(d["token"]))
        assert srv.metric("shotstream_sessions_refused_total", {"reason": "quota"}) >= 1
        d2 = srv.create(seed=2)  # the slot is free again
        httpx.delete(f"{srv.base}/v1/sessions/{d2['session_id']}", headers=auth(d2["token"]))
    finally:
        assert srv.stop() == 0


def test_capacity_limit_is_503(tmp_path):
    srv = ServerProcess(tmp_path, max_sessions=1, max_sessions_per_client=5).wait_ready()
    try:
        d = srv.create(seed=1)
        r = httpx.post(srv.base + "/v1/sessions", json={"prompt": "second"})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["code"] == "over_capacity"
        assert srv.metric("shotstream_sessions_refused_total", {"reason": "capacity"}) == 1
        assert srv.metric("shotstream_free_slots") == 0
        httpx.delete(f"{srv.base}/v1/sessions/{d['session_id']}", headers=auth(d["token"]))
        assert srv.metric("shotstream_free_slots") == 1
    finally:
        assert srv.stop() == 0


def test_api_key_guards_creation(tmp_path):
    srv = ServerProcess(tmp_path, api_key="s3cret").wait_ready()
    try:
        assert httpx.post(srv.base + "/v1/sessions", json={"prompt": "p"}).status_code == 401
        r = httpx.post(srv.base + "/v1/sessions", json={"prompt": "p"}, headers=auth("wrong"))
        assert r.status_code == 401
        r = httpx.post(srv.base + "/v1/sessions", json={"prompt": "p"}, headers=auth("s3cret"))
        assert r.status_code == 201
        httpx.delete(
            f"{srv.base}/v1/sessions/{r.json()['session_id']}", headers=auth(r.json()["token"])
        )
    finally:
        assert srv.stop() == 0
