"""Hostile input against a real server: a schema fuzzer on the REST half (never a 500), a
property fuzzer on the stream socket (every frame answered, the stream goes on), prompt
floods (rate limited, nothing acknowledged is lost), malformed tokens and keys, hostile
prompt text, CORS, and logs that keep prompts and tokens out."""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import quote

import httpx
import pytest
import schemathesis
import torch
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from server.protocol import ErrorCode
from tests.server.conftest import API_KEY, ORIGIN
from tests.support.server import ServerProcess, StreamClient, reconnect

KEY = {"X-API-Key": API_KEY}
ERROR_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def auth(d: dict) -> dict:
    return {"Authorization": f"Bearer {d['token']}"}


def delete(server: ServerProcess, d: dict) -> None:
    httpx.delete(f"{server.base}/v1/sessions/{d['session_id']}", headers=auth(d))


@pytest.fixture(autouse=True)
def _subnormals():
    """tests/conftest.py flushes denormals for the model tests; hypothesis needs them to
    generate floats. This module runs no torch code in process."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


# -- REST: schemathesis over /openapi.json ---------------------------------------------------
# (driven through hypothesis directly: schemathesis' pytest plugin does not run on pytest 9)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_rest_api_never_answers_500(edge_server, mode):
    """Generated (and, negative, deliberately invalid) requests to every operation of
    /openapi.json: a 4xx with a readable `detail`, or a documented 2xx/503, never a server
    error. Half of the session routes are aimed at a live session with its token, so the
    handlers themselves run."""
    schema = schemathesis.openapi.from_url(edge_server.base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    def check(case) -> None:
        headers, live = dict(KEY), None
        if "sid" in (case.path_parameters or {}) and len(repr(case.body)) % 2 == 0:
            live = edge_server.create(seed=1)
            case.path_parameters["sid"] = live["session_id"]
            headers = auth(live)
        response = case.call(base_url=edge_server.base, headers=headers)
        code = response.status_code
        assert code < 500 or (code == 503 and "retry-after" in response.headers), (
            case.as_curl_command(),
            response.text[:300],
        )
        if 400 <= code < 500 and code != 405 and case.method.upper() != "HEAD":  # HEAD: no body
            assert response.json()["detail"], response.text
        if code == 201 and case.path == "/v1/sessions":
            delete(edge_server, response.json())
        if live:
            delete(edge_server, live)

    fuzz = settings(
        max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    fuzzed = []
    for op in operations:
        try:
            fuzz(given(case=op.as_strategy(mode))(check))()
            fuzzed.append(op.label)
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode == GenerationMode.NEGATIVE, op.label
    assert {"POST /v1/sessions", "POST /v1/sessions/{sid}/prompts"} <= set(fuzzed), fuzzed


# -- WebSocket: a property fuzzer over client frames --------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Everything a client may send but `stop` (it would end the session, not test it).
TYPES = ["prompt", "pause", "resume", "ping", "teleport", "", "PROMPT"]
frames = st.one_of(
    json_values.map(json.dumps),  # any JSON: arrays, numbers, objects without "type"
    st.fixed_dictionaries(
        {"type": st.sampled_from(TYPES)},
        optional={"prompt": json_values | st.text(), "mode": json_values, "ref": json_values},
    ).map(json.dumps),  # known types with wrong-typed or missing fields
    st.text(max_size=200),  # not JSON at all
    st.binary(max_size=200),  # binary frames
    st.integers(60_000, 70_000).map(lambda n: json.dumps({"type": "prompt", "prompt": "x" * n})),
)


@pytest.fixture(scope="module")
def fuzz_session(edge_server):
    d = edge_server.create(seed=2, mode="queue")
    yield d
    delete(edge_server, d)


@settings(deadline=None, max_examples=40, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(frames, min_size=1, max_size=6))
def test_any_client_frames_get_answers_and_the_stream_goes_on(edge_server, fuzz_session, batch):
    """Each batch on a fresh connection to one session (fewer bad frames than the abuse
    limit): every frame gets its answer before the closing ping's pong, errors are
    non-fatal with a known code, and the connection stays open."""
    d = fuzz_session

    async def go():
        c = await reconnect(f"{d['stream_url']}?token={d['token']}")  # the last batch's may linger
        try:
            await c.until(lambda m: m["type"] == "init")
            for frame in batch:
                await c.send(frame)
            await c.send({"type": "ping", "ref": "end"})
            await c.until(lambda m: m["type"] == "pong" and m.get("ref") == "end")
            await c.send({"type": "resume"})  # leave it streaming for the next batch
            await c.send({"type": "ping", "ref": "end2"})
            await c.until(lambda m: m["type"] == "pong" and m.get("ref") == "end2")
            return c.stream
        finally:
            await c.__aexit__()

    stream = run(go())
    errors = stream.of("error")
    assert all(e["code"] in ERROR_CODES and not e["fatal"] for e in errors), errors
    assert stream.close_code is None
    seqs = [c.message["seq"] for c in stream.chunks]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True


def test_prompt_flood_is_rate_limited_and_every_acked_prompt_is_shown_or_dropped(edge_server):
    """60 cut prompts at once: the per-session rate limit (burst 8, then 4/s) answers the
    excess with `rate_limited` errors naming each prompt's ref, the connection stays open,
    and every acknowledged prompt is either shown (`shot` with its shot_id, starting at
    the chunk it was acknowledged for) or reported `prompt_dropped`."""
    d = edge_server.create(seed=3)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            for i in range(60):
                await c.send({"type": "prompt", "prompt": f"flood shot {i}", "ref": f"p{i}"})
            replies: dict[str, dict] = {}
            await c.until(
                lambda m: (
                    (m.get("ref") or "").startswith("p")
                    and replies.setdefault(m["ref"], m)
                    and len(replies) == 60
                )
            )
            acked = {m["shot_id"]: m for m in replies.values() if m["type"] == "prompt_ack"}
            shown, dropped = {}, {}

            def settled(m):
                if m["type"] == "shot" and m["shot_id"] in acked:
                    shown[m["shot_id"]] = m
                if m["type"] == "prompt_dropped" and m["shot_id"] in acked:
                    dropped[m["shot_id"]] = m
                return len(shown) + len(dropped) == len(acked)

            for m in c.stream.messages:
                settled(m)
            if len(shown) + len(dropped) < len(acked):
                await c.until(settled)
            await c.chunks(1)
            await c.send({"type": "stop"})
            return replies, acked, shown, dropped, await c.closed()

    replies, acked, shown, dropped, st_ = run(go())
    limited = [m for m in replies.values() if m["type"] == "error"]
    assert 8 <= len(acked) < 60 and len(acked) + len(limited) == 60
    assert all(m["code"] == "rate_limited" and not m["fatal"] for m in limited)
    assert set(shown) | set(dropped) == set(acked) and not set(shown) & set(dropped)
    assert all(m["reason"] for m in dropped.values())
    for sid, shot in shown.items():  # shown where it was announced, with its own text
        assert shot["prompt"] == f"flood shot {int(replies_ref(replies, sid)[1:])}"
        first = next(c.message for c in st_.chunks if c.message["seq"] == shot["starts_at_seq"])
        assert first["shot_id"] == sid
    assert st_.of("ended")[0]["reason"] == "stopped"


def replies_ref(replies: dict[str, dict], shot_id: int) -> str:
    return next(ref for ref, m in replies.items() if m.get("shot_id") == shot_id)


def test_queued_prompts_are_all_shown_in_order(edge_server):
    """Queued prompts are never dropped: each becomes a shot at the starts_at_seq it was
    last acknowledged with, in the order sent."""
    d = edge_server.create(seed=4)
    texts = [f"queued shot {i}" for i in range(4)]

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            for i, t in enumerate(texts):
                await c.send({"type": "prompt", "prompt": t, "mode": "queue", "ref": f"q{i}"})
            await c.until(lambda m: m["type"] == "shot" and m["prompt"] == texts[-1])
            await c.send({"type": "stop"})
            return await c.closed()

    st_ = run(go())
    mine = {m["shot_id"] for m in st_.of("prompt_ack") if (m.get("ref") or "").startswith("q")}
    acks: dict[int, dict] = {}
    for m in st_.of("prompt_ack"):
        if m["shot_id"] in mine:
            acks[m["shot_id"]] = m  # a later ack (the plan moved) overrides
    shots = [m for m in st_.of("shot") if m["shot_id"] in acks]
    assert [s["prompt"] for s in shots] == texts and not st_.of("prompt_dropped")
    for s in shots:
        assert s["starts_at_seq"] == acks[s["shot_id"]]["starts_at_seq"]


# -- tokens and keys ----------------------------------------------------------------------------
def test_malformed_tokens_and_keys_are_refused_not_crashed(edge_server):
    a, b = edge_server.create(seed=5), edge_server.create(seed=6)
    url = f"{edge_server.base}/v1/sessions/{a['session_id']}"
    bad = [
        b"Bearer " + "é".encode("latin-1"),
        b"Bearer " + "ü".encode(),
        b"Bearer " + b"x" * 8000,
        b"Bearer " + a["token"][:-1].encode(),
        b"Bearer " + a["token"].encode() + b"x",
        b"Bearer " + b["token"].encode(),
        b"Token " + a["token"].encode(),
        b"Bearer",
    ]
    for value in bad:
        r = httpx.get(url, headers={"Authorization": value})
        assert r.status_code in (401, 404), (value[:20], r.status_code, r.text)
        assert r.json()["code"] in ("unauthorized", "unknown_session")
    for key in ("é".encode("latin-1"), "ü".encode(), b"x" * 8000, API_KEY[:-1].encode()):
        r = httpx.post(
            f"{edge_server.base}/v1/sessions", json={"prompt": "p"}, headers={"X-API-Key": key}
        )
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
    assert httpx.post(f"{edge_server.base}/v1/sessions", json={"prompt": "p"}).status_code == 401

    async def stream(query: str):
        async with StreamClient(f"{a['stream_url']}?{query}", None) as c:
            return await c.closed()

    for query in ("token=%C3%A9", "token=%00", "token=" + "x" * 8000, f"token={b['token']}"):
        st_ = run(stream(query))
        assert st_.close_code in (4001, 4004) and not st_.chunks, (query[:20], st_.close_code)
    for d in (a, b):
        delete(edge_server, d)
    # A malformed last_seq is ignored (a fresh start), never a crash.
    for last in ("%C2%B2", "9" * 5000, "-", "1e3"):
        d = edge_server.create(seed=8)

        async def go(d=d, last=last):
            async with StreamClient(
                f"{d['stream_url']}?token={d['token']}&last_seq={last}", None
            ) as c:
                hello = await c.until(lambda m: m["type"] == "hello")
                await c.chunks(1)
                return hello

        assert run(go())["next_seq"] == 0
        delete(edge_server, d)


def test_a_long_non_ascii_session_id_is_refused_with_a_close_frame(edge_server):
    """The refusal's close reason repeats its error message, cut to the 123 bytes a close
    frame holds (61 `é` make it 150 bytes in under 120 characters), never mid-character:
    the client gets the error and close 4004, not a dropped connection (1006)."""
    ws_base = edge_server.base.replace("http://", "ws://")
    url = f"{ws_base}/v1/sessions/{quote('é' * 61)}/stream"

    async def go():
        async with StreamClient(url, "x" * 43) as c:
            return await c.closed()

    st_ = run(go())
    [err] = st_.of("error")
    assert err["code"] == "unknown_session" and "é" * 61 in err["message"]
    assert st_.close_code == 4004
    assert 0 < len(st_.close_reason.encode()) <= 123 and err["message"].startswith(st_.close_reason)


# -- hostile prompt text ------------------------------------------------------------------------
PLANES = "".join(chr(0x10000 * p + 0x41) for p in range(17))  # one code point of each plane
CONTROL = "".join(chr(c) for c in range(0x20)) + "\x7f\x85\u2028\u2029\u202e\ufeff\ufffd"


@pytest.mark.parametrize(
    "text",
    [
        PLANES,
        CONTROL,
        "a\u0000b",
        "🎬 close-up shot 😀",
        "\ud800 lone surrogate \udfff",
        "x" * 8000,
        "‮right-to-left‬ override",
        "<script>alert(1)</script>",
    ],
    ids=[
        "every-plane",
        "controls",
        "nul",
        "emoji",
        "lone-surrogates",
        "at-the-limit",
        "bidi",
        "html",
    ],
)
def test_any_unicode_prompt_is_taken_and_echoed_exactly(edge_server, text):
    """As a caption, a first shot and a mid-stream prompt: accepted (or a 422 that names
    the limit), and the `shot` message carries the text back unchanged."""
    body = json.dumps({"prompt": text, "shots": [text], "seed": 7})  # \\uXXXX escapes
    r = httpx.post(
        f"{edge_server.base}/v1/sessions",
        content=body,
        headers={**KEY, "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text
    d = r.json()

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            first = await c.until(lambda m: m["type"] == "shot")
            await c.send(json.dumps({"type": "prompt", "prompt": text, "ref": "u"}))
            ack = await c.until(lambda m: m.get("ref") == "u")
            assert ack["type"] == "prompt_ack", ack
            shot = await c.until(lambda m: m["type"] == "shot" and m["shot_id"] == ack["shot_id"])
            await c.send({"type": "stop"})
            await c.closed()
            return first, shot

    first, shot = run(go())
    assert first["prompt"] == text and shot["prompt"] == text


# -- transport limits and CORS ------------------------------------------------------------------
def test_a_chunked_body_over_the_limit_is_413(edge_server):
    """The body limit holds for a body that does not declare its length."""

    def body():
        for _ in range(40):
            yield b'{"prompt": "' + b"x" * 8192

    r = httpx.post(
        f"{edge_server.base}/v1/sessions",
        content=body(),
        headers={**KEY, "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"


def test_cors_allows_only_the_configured_origin(edge_server):
    def preflight(origin):
        return httpx.options(
            f"{edge_server.base}/v1/sessions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )

    ok = preflight(ORIGIN)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    evil = preflight("https://evil.example")
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    r = httpx.get(f"{edge_server.base}/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# -- what the logs keep out ---------------------------------------------------------------------
def test_info_logs_hold_no_prompt_text_and_no_token(edge_server):
    marker = "zebra-unlikely-marker-7c1e"
    r = httpx.post(
        f"{edge_server.base}/v1/sessions",
        json={"prompt": f"caption {marker}", "shots": [f"shot {marker}"]},
        headers=KEY,
    )
    d = r.json()

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.send({"type": "prompt", "prompt": f"prompt {marker}", "ref": "m"})
            await c.until(lambda m: m.get("ref") == "m")
            await c.send({"type": "prompt", "prompt": f"{marker} " + "y" * 9000})  # over limit
            await c.until(lambda m: m["type"] == "error")
            await c.send({"type": "stop"})
            await c.closed()

    run(go())
    httpx.post(
        f"{edge_server.base}/v1/sessions/{d['session_id']}/prompts",
        json={"prompt": f"rest {marker}"},
        headers=auth(d),
    )
    log = edge_server.log()
    assert d["session_id"] in log  # the events were logged, with the session id
    assert marker not in log and d["token"] not in log and API_KEY not in log


def test_a_token_under_any_spelling_of_its_name_stays_out_of_the_logs(edge_server):
    """The server decodes query parameter names (`?%74oken=` is `token`), so the logs'
    redaction does too: a token the server accepts under any spelling is never logged,
    nor an API key sent as a query parameter."""
    for name in ("%74oken", "tok%65n", "%74%6F%6B%65%6E", "token"):
        d = edge_server.create(seed=11)

        async def go(d=d, name=name):
            async with StreamClient(f"{d['stream_url']}?{name}={d['token']}", None) as c:
                await c.until(lambda m: m["type"] == "hello")  # taken as the token
                await c.send({"type": "stop"})
                await c.closed()

        run(go())
        url = f"{edge_server.base}/v1/sessions/{d['session_id']}?{name}={d['token']}"
        assert httpx.get(url + f"&api%5Fkey={API_KEY}", headers=auth(d)).status_code == 200
        log = edge_server.log()
        assert d["token"] not in log and API_KEY not in log, name
        assert f"{name}=[redacted]" in log and "api%5Fkey=[redacted]" in log


def test_debug_logs_hold_no_prompt_text_and_no_token(tmp_path):
    """At log level debug the server's own loggers go verbose, but the WebSocket library's
    frame and handshake traces (headers with the token, frames with prompts) stay out."""
    srv = ServerProcess(tmp_path, log_level="debug", realtime_margin=50).wait_ready()
    try:
        marker = "okapi-unlikely-marker-41d2"
        d = srv.create(prompt=f"caption {marker}", seed=9)

        async def go():
            headers = {"Authorization": f"Bearer {d['token']}"}
            async with websockets.connect(d["stream_url"], additional_headers=headers) as ws:
                await ws.send(
                    json.dumps({"type": "prompt", "prompt": f"prompt {marker}", "ref": "d"})
                )
                while (m := await ws.recv()) and not (
                    isinstance(m, str) and json.loads(m).get("ref") == "d"
                ):
                    pass
                await ws.send(json.dumps({"type": "stop"}))
                with contextlib.suppress(websockets.ConnectionClosed):
                    while True:
                        await ws.recv()

        run(go())
        log = srv.log()
        assert d["session_id"] in log  # the session's events were logged
        assert marker not in log and d["token"] not in log
    finally:
        assert srv.stop() == 0
