"""Wire schema v1: field names fixed by docs/design/protocol.md §1, round trips, and bad input as
clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from server import protocol as p
from server.protocol import (
    CloseCode,
    CreateSessionRequest,
    ErrorCode,
    LimitError,
    Limits,
    ProtocolError,
    parse_client_message,
    parse_server_message,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def keys(names: str) -> set[str]:
    """A set of wire field names written as one space-separated string."""
    return set(names.split())


# One instance of every WebSocket message, with its wire keys (docs/design/protocol.md §5–§6).
SERVER_MESSAGES: list[tuple[BaseModel, set[str]]] = [
    (
        p.HelloMessage(
            session_id="s1", mime='video/mp4; codecs="avc1.42C01E"', width=832, height=480, fps=16
        ),
        {
            "type",
            "protocol",
            "session_id",
            "mime",
            "width",
            "height",
            "fps",
            "next_seq",
            "features",
            "role",
            "viewers",
        },
    ),
    (p.InitMessage(bytes=812), {"type", "bytes"}),
    (
        p.ChunkMessage(
            seq=3,
            shot=1,
            shot_id=7,
            first_frame=45,
            frames=12,
            pts=2.8125,
            duration=0.75,
            bytes=40_000,
            timings=p.ChunkTimings(
                denoise_ms=300.5, refresh_ms=80.0, decode_ms=90.0, encode_ms=20.0, queue_ms=1.5
            ),
        ),
        keys("type seq shot shot_id first_frame frames pts duration bytes timings"),
    ),
    (
        p.ShotMessage(shot_id=7, shot=1, prompt="a cat turns", starts_at_seq=7, truncated_tokens=3),
        {"type", "shot_id", "shot", "prompt", "starts_at_seq", "truncated_tokens"},
    ),
    (
        p.PromptAckMessage(shot_id=7, starts_at_seq=7),
        {"type", "shot_id", "starts_at_seq", "truncated_tokens", "ref"},
    ),
    (
        p.ErrorMessage(code=ErrorCode.SESSION_FAILED, message="CUDA out of memory", fatal=True),
        {"type", "code", "message", "fatal", "ref"},
    ),
    (p.EndedMessage(reason="stopped"), {"type", "reason"}),
    (
        p.PromptDroppedMessage(shot_id=7, reason="superseded by a later cut"),
        {"type", "shot_id", "reason"},
    ),
    (p.WithdrawMessage(seqs=[9, 10], pts=5.25, shot_id=8), {"type", "seqs", "pts", "shot_id"}),
    (p.PongMessage(server_time=1_700_000_000.25), {"type", "server_time", "ref"}),
    (p.ViewersMessage(count=3), {"type", "count"}),
    (p.SkippedMessage(seqs=[4, 5], next_seq=6), {"type", "seqs", "next_seq"}),
    (
        p.QueuedMessage(position=2, queue_length=3, estimated_wait_s=40.0),
        {"type", "position", "queue_length", "estimated_wait_s"},
    ),
]

CLIENT_MESSAGES: list[tuple[BaseModel, set[str]]] = [
    (p.PromptMessage(prompt="a dog runs", mode="queue"), {"type", "prompt", "mode", "ref"}),
    (p.PauseMessage(), {"type", "ref"}),
    (p.ResumeMessage(), {"type", "ref"}),
    (p.StopMessage(), {"type", "ref"}),
    (p.PingMessage(), {"type", "ref"}),
    (p.PlayheadMessage(pts=3.5), {"type", "pts", "ref"}),
]


def _ids(cases: list[tuple[BaseModel, set[str]]]) -> list[str]:
    return [type(m).__name__ for m, _ in cases]


@pytest.mark.parametrize(("msg", "keys"), SERVER_MESSAGES, ids=_ids(SERVER_MESSAGES))
def test_server_message_round_trips_with_protocol_field_names(msg: BaseModel, keys: set[str]):
    wire = msg.model_dump_json()
    assert set(json.loads(wire)) == keys
    assert parse_server_message(wire) == msg


@pytest.mark.parametrize(("msg", "keys"), CLIENT_MESSAGES, ids=_ids(CLIENT_MESSAGES))
def test_client_message_round_trips_with_protocol_field_names(msg: BaseModel, keys: set[str]):
    wire = msg.model_dump_json()
    assert set(json.loads(wire)) == keys
    assert parse_client_message(wire) == msg


def test_chunk_timings_carry_every_stage() -> None:
    chunk = json.loads(SERVER_MESSAGES[2][0].model_dump_json())
    assert set(chunk["timings"]) == keys("denoise_ms refresh_ms decode_ms encode_ms queue_ms")


def test_hello_announces_protocol_version_1() -> None:
    hello = json.loads(SERVER_MESSAGES[0][0].model_dump_json())
    assert hello["protocol"] == p.PROTOCOL_VERSION == 1


def test_every_type_literal_is_in_its_union() -> None:
    assert set(p.SERVER_MESSAGE_TYPES) == {
        type(m).model_fields["type"].default for m, _ in SERVER_MESSAGES
    }
    assert set(p.CLIENT_MESSAGE_TYPES) == {"prompt", "pause", "resume", "stop", "ping", "playhead"}
    assert isinstance(p.client_message_adapter.validate_python({"type": "stop"}), p.StopMessage)
    assert isinstance(
        p.server_message_adapter.validate_json('{"type":"init","bytes":5}'), p.InitMessage
    )


def test_fields_added_by_a_newer_peer_are_ignored() -> None:
    msg = parse_client_message('{"type": "ping", "client_time": 12.5}')
    assert msg == p.PingMessage()
    hello = parse_server_message(
        '{"type":"hello","protocol":1,"session_id":"s","mime":"m","width":2,"height":2,"fps":16,"resume_from_seq":4}'
    )
    assert isinstance(hello, p.HelloMessage)


def test_rest_bodies_round_trip() -> None:
    bodies: list[BaseModel] = [
        CreateSessionRequest(prompt="a city at night", shots=["rain", "sun"], seed=7, mode="queue"),
        p.CreateSessionResponse(
            session_id="s1",
            token="t",
            stream_url="/v1/sessions/s1/stream",
            expires_at=NOW,
            grace_s=30.0,
            preset="tiny",
            width=64,
            height=32,
            fps=16,
            truncated_tokens=2,
        ),
        p.SessionStatus(
            session_id="s1",
            state="paused",
            shot=2,
            chunk_seq=15,
            frames_sent=177,
            queued_prompts=1,
            created_at=NOW,
            error=None,
        ),
        p.PromptRequest(prompt="closer", mode="cut"),
        p.PromptAccepted(shot_id=3, starts_at_seq=16, truncated_tokens=0),
        p.ModelInfo(
            preset="wan2.1-1.3b",
            description="ShotStream",
            width=832,
            height=480,
            fps=16,
            chunk_frames=12,
            first_chunk_frames=9,
            chunks_per_shot=7,
            max_prompt_tokens=512,
            real_weights=True,
        ),
        p.ErrorBody(
            detail="prompt is 9000 characters; the limit is 8000", code=ErrorCode.PROMPT_TOO_LONG
        ),
        p.CreateViewerRequest(ttl_s=60.0),
        p.ViewerLink(
            viewer_id="v1",
            token="t",
            watch_url="/?watch=s1#token=t",
            stream_url="/w",
            expires_at=NOW,
        ),
        p.ViewerList(
            viewers=[p.ViewerInfo(viewer_id="v1", expires_at=NOW, state="active", connected=2)],
            connected=2,
        ),
    ]
    for body in bodies:
        assert type(body).model_validate_json(body.model_dump_json()) == body
        type(body).model_json_schema()  # OpenAPI needs a schema for every body
    status = json.loads(bodies[2].model_dump_json())
    assert set(status) == keys(
        "session_id state shot chunk_seq frames_sent queued_prompts created_at error "
        "viewers queue_position estimated_wait_s recording"
    )
    created = json.loads(bodies[1].model_dump_json())
    assert set(created) == keys(
        "session_id token stream_url expires_at grace_s preset width height fps truncated_tokens "
        "state queue_position estimated_wait_s"
    )
    assert datetime.fromisoformat(created["expires_at"]) == NOW


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type": "prompt", "prompt": "x"', ErrorCode.BAD_JSON),
        ("not json at all", ErrorCode.BAD_JSON),
        ("", ErrorCode.BAD_JSON),
        ("[" * 50_000, ErrorCode.BAD_JSON),  # nesting deep enough to overflow the decoder
        ('{"type": "ping", "n": ' + "9" * 5000 + "}", ErrorCode.BAD_JSON),
        ('["ping"]', ErrorCode.BAD_MESSAGE),
        ('"ping"', ErrorCode.BAD_MESSAGE),
        ("null", ErrorCode.BAD_MESSAGE),
        ("{}", ErrorCode.BAD_MESSAGE),
        ('{"type": 3}', ErrorCode.BAD_MESSAGE),
        ('{"type": "dance"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "hello"}', ErrorCode.UNKNOWN_TYPE),  # a server message sent by a client
        ('{"type": "prompt"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "prompt", "prompt": 42}', ErrorCode.BAD_MESSAGE),
        ('{"type": "prompt", "prompt": ["a"]}', ErrorCode.BAD_MESSAGE),
        ('{"type": "prompt", "prompt": "   "}', ErrorCode.BAD_MESSAGE),
        ('{"type": "prompt", "prompt": "x", "mode": "later"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "prompt", "prompt": "' + "x" * 8001 + '"}', ErrorCode.PROMPT_TOO_LONG),
        ('{"type": "prompt", "prompt": "' + "x" * 70_000 + '"}', ErrorCode.MESSAGE_TOO_LARGE),
        ('{"type": "prompt", "prompt": "' + "é" * 40_000 + '"}', ErrorCode.MESSAGE_TOO_LARGE),
        (b'{"type": "ping"}', ErrorCode.BINARY_NOT_ALLOWED),
    ],
    ids=lambda v: v[:30] if isinstance(v, str) else None,
)
def test_bad_client_frame_gives_protocol_error_with_code(frame: str | bytes, code: str) -> None:
    err = parse_client_message(frame)
    assert isinstance(err, ProtocolError), err
    assert err.code == code
    assert 0 < len(err.message) < 300  # readable, and never echoes a huge input
    wire = json.loads(err.to_message(fatal=False).model_dump_json())
    assert wire == {
        "type": "error",
        "code": code,
        "message": err.message,
        "fatal": False,
        "ref": None,
    }


def test_validation_error_names_the_field() -> None:
    err = parse_client_message('{"type": "prompt", "prompt": 42}')
    assert isinstance(err, ProtocolError)
    assert "prompt" in err.message and "string" in err.message


def test_unknown_type_error_lists_the_known_types() -> None:
    err = parse_client_message('{"type": "dance"}')
    assert isinstance(err, ProtocolError)
    assert "dance" in err.message and "prompt" in err.message


def test_limits_are_configurable() -> None:
    long = json.dumps({"type": "prompt", "prompt": "x" * 9000})
    assert isinstance(parse_client_message(long, Limits(max_prompt_chars=10_000)), p.PromptMessage)
    small = Limits(max_message_bytes=100)
    err = parse_client_message(json.dumps({"type": "prompt", "prompt": "y" * 200}), small)
    assert isinstance(err, ProtocolError) and err.code == ErrorCode.MESSAGE_TOO_LARGE
    assert "100" in err.message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text: str) -> None:
    result = parse_client_message(text)
    assert isinstance(result, ProtocolError) or type(result) in p.CLIENT_MESSAGE_TYPES.values()


# Subnormal floats: the root conftest flushes denormals, which hypothesis refuses to run under.
_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False)
_json = st.recursive(
    _scalar | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_fields = st.dictionaries(st.sampled_from(["prompt", "mode", "type", "extra"]), _json)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["prompt", "pause", "ping", "hello", "x"]), _fields)
def test_arbitrary_objects_never_raise(kind: str, fields: dict) -> None:
    result = parse_client_message(json.dumps({"type": kind, **fields}))
    if isinstance(result, ProtocolError):
        assert result.code in {ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_TYPE}
    else:
        assert result.type == (fields.get("type", kind))


# -------------------------------------------------------------------- create validation


def test_create_request_defaults() -> None:
    req = CreateSessionRequest.model_validate_json('{"prompt": "a lighthouse"}')
    assert (req.shots, req.seed, req.mode) == ([], None, "cut")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": ""},
        {"prompt": "  \n"},
        {"prompt": 5},
        {"prompt": "ok", "shots": "one shot"},
        {"prompt": "ok", "shots": ["fine", ""]},
        {"prompt": "ok", "shots": [1]},
        {"prompt": "ok", "seed": "12"},
        {"prompt": "ok", "seed": 1.5},
        {"prompt": "ok", "seed": -1},
        {"prompt": "ok", "seed": 2**64},
        {"prompt": "ok", "mode": "interleave"},
    ],
)
def test_create_request_rejects_bad_fields(body: dict) -> None:
    with pytest.raises(ValidationError) as exc:
        CreateSessionRequest.model_validate_json(json.dumps(body))
    assert p.describe_validation_error(exc.value)  # a readable line for the 422


def test_validate_create_enforces_configured_limits() -> None:
    limits = Limits(max_prompt_chars=100, max_shots=2)
    p.validate_create(CreateSessionRequest(prompt="x" * 100, shots=["a", "b"]), limits)
    with pytest.raises(LimitError) as exc:
        p.validate_create(CreateSessionRequest(prompt="x" * 101), limits)
    assert exc.value.code == ErrorCode.PROMPT_TOO_LONG and "100" in exc.value.message
    with pytest.raises(LimitError) as exc:
        p.validate_create(CreateSessionRequest(prompt="x", shots=["a"] * 3), limits)
    assert exc.value.code == ErrorCode.TOO_MANY_SHOTS
    with pytest.raises(LimitError) as exc:
        p.validate_create(CreateSessionRequest(prompt="x", shots=["a", "y" * 101]), limits)
    assert "shots[1]" in exc.value.message


def test_default_limits_accept_a_long_demo_caption() -> None:
    """The original demo captions run to ~350 words; the default limit must take them."""
    caption = " ".join(["cinematic"] * 350)  # ~3500 characters
    p.validate_create(CreateSessionRequest(prompt=caption, shots=[caption] * 3))
    with pytest.raises(LimitError):
        p.validate_create(CreateSessionRequest(prompt="x" * (p.DEFAULT_MAX_PROMPT_CHARS + 1)))


def test_validate_prompt_uses_the_same_limit() -> None:
    with pytest.raises(LimitError):
        p.validate_prompt(p.PromptRequest(prompt="x" * 11), Limits(max_prompt_chars=10))


# -------------------------------------------------------------------------- close codes


def test_close_codes_are_application_codes() -> None:
    assert all(4000 <= c <= 4999 for c in CloseCode)
    assert CloseCode.ALREADY_CONNECTED == 4009  # docs/design/protocol.md §12
    assert len({int(c) for c in CloseCode}) == len(CloseCode)


def test_fatal_errors_map_to_close_codes() -> None:
    assert p.close_code_for(ErrorCode.UNAUTHORIZED) == CloseCode.UNAUTHORIZED == 4001
    assert p.close_code_for(ErrorCode.ALREADY_CONNECTED) == 4009
    assert p.close_code_for(ErrorCode.TOO_MANY_ERRORS) == CloseCode.BAD_MESSAGE
    assert p.close_code_for(ErrorCode.SLOW_READER) == CloseCode.IDLE
    assert p.close_code_for(ErrorCode.DRAINING) == CloseCode.DRAINING
    assert p.close_code_for(ErrorCode.OUT_OF_MEMORY) == CloseCode.SESSION_FAILED


@pytest.mark.parametrize(
    "text",
    ["é" * 61, "x" * 200, "🎬" * 40, "a" + "é" * 100, "no session 'r0.x'", "", "\ud800" * 50],
)
def test_close_reason_fits_a_close_frame_without_splitting_a_character(text: str) -> None:
    """A close frame holds 123 bytes of reason (RFC 6455 §5.5); the cut keeps as much as
    fits and whole characters only (a lone surrogate, unencodable, becomes `?`)."""
    cut = p.close_reason(text)
    size = len(cut.encode())
    assert size <= 123 and (size >= 120 or len(text.encode("utf-8", "replace")) <= 123)
    assert text.encode("utf-8", "replace").decode().startswith(cut)


def test_protocol_imports_without_torch() -> None:
    """Clients import this module; it must not drag in model code or torch."""
    code = "import sys, server.protocol; assert 'torch' not in sys.modules, 'torch imported'"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=repo)


def test_server_messages_parse_through_the_typed_union() -> None:
    adapter: TypeAdapter = p.server_message_adapter
    for msg, _ in SERVER_MESSAGES:
        assert adapter.validate_json(msg.model_dump_json()) == msg
    err = parse_server_message('{"type": "future_thing"}')
    assert isinstance(err, ProtocolError) and err.code == ErrorCode.UNKNOWN_TYPE
