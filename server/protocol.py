"""Wire protocol v1: every REST body and WebSocket message, as pydantic models.

This module is the contract of docs/design/protocol.md §1; clients import it, so it must
stay importable without torch or any model code. Field names are fixed by the protocol: add
fields, never rename them. Readers ignore unknown fields so either side can add some.

Times: `expires_at` and `created_at` are ISO 8601 UTC datetimes; `pts`, `duration` and
`server_time` are float seconds (`server_time` since the Unix epoch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

PROTOCOL_VERSION = 1

# Default limits; the server's settings may override each one (see `Limits`).
DEFAULT_MAX_PROMPT_CHARS = 8_000
DEFAULT_MAX_SHOTS = 32
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed

Mode: TypeAlias = Literal["cut", "queue"]

# Features a client asks for on its stream URL (`?features=withdraw`) and the server lists
# in `hello.features` when it enables them for that connection. Version 1 clients ask for
# none and see none of their messages.
FEATURE_WITHDRAW = "withdraw"  # instant cuts: `playhead` reports in, `withdraw` out
FEATURE_VIEWERS = "viewers"  # the owner is told how many viewers watch (`viewers` messages)
FEATURES = (FEATURE_WITHDRAW, FEATURE_VIEWERS)
# `queued`: in the waiting room (docs/design/protocol.md §17), not yet generating.
SessionState: TypeAlias = Literal["queued", "waiting", "streaming", "paused", "ended", "failed"]
Role: TypeAlias = Literal["owner", "viewer"]


@dataclass(frozen=True)
class Limits:
    """Input limits the server enforces; built from settings, defaults per docs/design/protocol.md §13."""

    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_shots: int = DEFAULT_MAX_SHOTS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


DEFAULT_LIMITS = Limits()


class ErrorCode:
    """`code` strings of `error` messages and REST `ErrorBody`s. Clients branch on these."""

    # Bad client input (never fatal on its own; repeated abuse closes with 4400).
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"  # not an object, missing or wrong-typed field
    UNKNOWN_TYPE = "unknown_type"
    MESSAGE_TOO_LARGE = "message_too_large"
    BINARY_NOT_ALLOWED = "binary_not_allowed"
    PROMPT_TOO_LONG = "prompt_too_long"  # over the character limit
    PROMPT_TOO_MANY_TOKENS = "prompt_too_many_tokens"  # over the token limit, overflow=reject
    TOO_MANY_SHOTS = "too_many_shots"
    INVALID_STATE = "invalid_state"  # e.g. resume while not paused, prompt after stop
    TOO_MANY_ERRORS = "too_many_errors"
    FORBIDDEN = "forbidden"  # a viewer token asked for what only the owner may do
    # Connection and session.
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_VIEWER = "unknown_viewer"  # no such watch link of this session
    VIEWER_LIMIT = "viewer_limit"  # too many watch links or viewers (session or server)
    NO_RECORDING = "no_recording"  # recording off, nothing recorded yet, or expired
    ALREADY_CONNECTED = "already_connected"
    REPLACED = "replaced"  # a newer connection of the session took over this one
    BAD_PLAYHEAD = "bad_playhead"  # a playhead the server did not send (ignored)
    RATE_LIMITED = "rate_limited"
    OVER_CAPACITY = "over_capacity"
    SLOW_READER = "slow_reader"
    IDLE = "idle"
    # Server side.
    SESSION_FAILED = "session_failed"
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL = "internal"
    DRAINING = "draining"


class CloseCode(IntEnum):
    """WebSocket close codes (application range 4000-4999); the reason repeats the error."""

    UNAUTHORIZED = 4001  # missing or wrong token; a watch link revoked or expired
    FORBIDDEN = 4003  # a viewer token on the owner's stream
    UNKNOWN_SESSION = 4004  # no such session, or it has ended
    ALREADY_CONNECTED = 4009  # a second stream connection (docs/design/protocol.md §12)
    REPLACED = 4010  # a newer connection with the session's token took over: do not reconnect
    BAD_MESSAGE = 4400  # repeated malformed or abusive input
    RATE_LIMITED = 4429  # a flood of messages past the per-connection rate
    IDLE = 4408  # idle or too slow a reader
    SESSION_FAILED = 4500  # the session failed or an internal error
    DRAINING = 4503  # draining, starting or full: try again later (or another replica)


_CLOSE_FOR_ERROR = {
    ErrorCode.UNAUTHORIZED: CloseCode.UNAUTHORIZED,
    ErrorCode.FORBIDDEN: CloseCode.FORBIDDEN,
    ErrorCode.VIEWER_LIMIT: CloseCode.DRAINING,  # 4503: full, try again later
    ErrorCode.UNKNOWN_SESSION: CloseCode.UNKNOWN_SESSION,
    ErrorCode.ALREADY_CONNECTED: CloseCode.ALREADY_CONNECTED,
    ErrorCode.REPLACED: CloseCode.REPLACED,
    ErrorCode.RATE_LIMITED: CloseCode.RATE_LIMITED,
    ErrorCode.BAD_JSON: CloseCode.BAD_MESSAGE,
    ErrorCode.BAD_MESSAGE: CloseCode.BAD_MESSAGE,
    ErrorCode.UNKNOWN_TYPE: CloseCode.BAD_MESSAGE,
    ErrorCode.MESSAGE_TOO_LARGE: CloseCode.BAD_MESSAGE,
    ErrorCode.BINARY_NOT_ALLOWED: CloseCode.BAD_MESSAGE,
    ErrorCode.TOO_MANY_ERRORS: CloseCode.BAD_MESSAGE,
    ErrorCode.SLOW_READER: CloseCode.IDLE,
    ErrorCode.IDLE: CloseCode.IDLE,
    ErrorCode.DRAINING: CloseCode.DRAINING,
    ErrorCode.OVER_CAPACITY: CloseCode.DRAINING,  # 4503: not ready or full, try again later
}


def close_code_for(code: str) -> CloseCode:
    """The close code that follows a fatal `error` with this `code` (4500 when unlisted)."""
    return _CLOSE_FOR_ERROR.get(code, CloseCode.SESSION_FAILED)


def close_reason(text: str) -> str:
    """`text` cut to fit a close frame's reason (123 UTF-8 bytes), never mid-character: a
    longer one makes the WebSocket layer drop the connection without a close frame."""
    return text.encode("utf-8", "replace")[:123].decode("utf-8", "ignore")


class _Schema(BaseModel):
    # Ignore unknown fields: the protocol lets either side add fields without a version bump.
    model_config = ConfigDict(extra="ignore")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# Client text: a real JSON string (no coercion from numbers) with something in it.
Text: TypeAlias = Annotated[StrictStr, AfterValidator(_not_blank)]
Seed: TypeAlias = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]


# ---------------------------------------------------------------------------------- REST


class CreateSessionRequest(_Schema):
    """`POST /v1/sessions` body. Character and shot limits are settings: `validate_create`."""

    prompt: Text = Field(description="global caption of the whole video")
    shots: list[Text] = Field(default_factory=list, description="first shot prompts, in order")
    seed: Seed | None = None
    mode: Mode = Field(default="cut", description="default for this session's prompts")
    wait: StrictBool = Field(
        default=False,
        description="when the server is full, wait in its queue (`202`, state `queued`) "
        "instead of a `503`",
    )


class CreateSessionResponse(_Schema):
    """`201` reply to `POST /v1/sessions`."""

    session_id: str
    token: str = Field(description="bearer token for every route of this session")
    stream_url: str
    expires_at: datetime = Field(
        description="when the session (and its token) expires, connected or not: creation + "
        "`session_max_s`; with no stream connected it ends sooner (`grace_s`)"
    )
    grace_s: float | None = Field(
        default=None,
        description="seconds the session lives with no stream connected, from creation or "
        "from its stream's drop (`session_grace_s`): the window to connect or resume in",
    )
    preset: str
    width: int
    height: int
    fps: int
    truncated_tokens: int = Field(
        default=0, ge=0, description="text tokens cut from the prompt and shots together"
    )
    state: SessionState = Field(
        default="waiting", description="`queued` (a `202` reply: in the waiting room) or `waiting`"
    )
    queue_position: int | None = Field(
        default=None, ge=1, description="queued: 1 = the next session to start"
    )
    estimated_wait_s: float | None = Field(
        default=None, ge=0, description="queued: seconds until it is likely to start, if known"
    )


class SessionStatus(_Schema):
    """`GET /v1/sessions/{id}` reply."""

    session_id: str
    state: SessionState
    shot: int = Field(ge=0, description="index of the current shot, from 0")
    chunk_seq: int = Field(ge=0, description="seq the next chunk will carry")
    frames_sent: int = Field(ge=0)
    queued_prompts: int = Field(ge=0)
    created_at: datetime
    error: str | None = None
    viewers: int = Field(default=0, ge=0, description="viewer connections watching it now")
    queue_position: int | None = Field(default=None, ge=1, description="while `queued`")
    estimated_wait_s: float | None = Field(default=None, ge=0, description="while `queued`")
    recording: str | None = Field(
        default=None,
        description="`recording` (so far complete), `complete` (the session ended and every "
        "chunk is in it), `incomplete` (recording stopped: see the timeline's "
        "`incomplete_reason`), or null (nothing recorded)",
    )


class PromptRequest(_Schema):
    """`POST /v1/sessions/{id}/prompts` body; same effect as the WebSocket `prompt`."""

    prompt: Text
    mode: Mode | None = Field(default=None, description="None: the session's mode")


class PromptAccepted(_Schema):
    """`202` reply to a prompt: the shot it starts and the chunk where it takes effect."""

    shot_id: int
    starts_at_seq: int = Field(ge=0)
    truncated_tokens: int = Field(default=0, ge=0)


class ModelInfo(_Schema):
    """`GET /v1/models` reply: the loaded preset and what a client needs to size a player."""

    preset: str
    description: str
    width: int
    height: int
    fps: int
    chunk_frames: int = Field(description="pixel frames in a chunk (12 for the real model)")
    first_chunk_frames: int = Field(description="pixel frames in a shot's first chunk (9)")
    chunks_per_shot: int
    max_prompt_tokens: int = Field(description="text encoder token limit (512)")
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_shots: int = DEFAULT_MAX_SHOTS
    real_weights: bool = Field(description="False: random weights (tests, CPU demo)")
    weights: str = Field(
        default="",
        description="where the weights came from: their folder's name (never its path), "
        "`bundled <preset> weights` or `random (seed N)`",
    )
    device: str = ""
    dtype: str = ""
    attention: str = Field(default="", description="attention backend in use")
    notice: str | None = Field(
        default=None, description="a warning users should see (random weights)"
    )
    vocabulary: dict[str, Any] | None = Field(
        default=None, description="for trained demo models: the prompt vocabulary they learned"
    )


class CapacityInfo(_Schema):
    """`GET /v1/capacity` reply: this replica's real-time session slots, for proxies and
    autoscalers (the same numbers as the `shotstream_*_slots`/`_sessions` gauges)."""

    replica_id: str
    ready: bool = Field(description="warmed up and not draining: it admits sessions")
    draining: bool
    capacity: int = Field(description="sessions this replica can keep real time now")
    sessions: int = Field(description="sessions alive (streaming, waiting or paused)")
    free_slots: int = Field(description="sessions it would admit now (0 unless ready)")


class CreateViewerRequest(_Schema):
    """`POST /v1/sessions/{id}/viewers` body (optional)."""

    ttl_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="the link expires after this many seconds (at most `viewer_link_ttl_s`, "
        "the default)",
    )


class ViewerLink(_Schema):
    """`201` reply to `POST /v1/sessions/{id}/viewers`: a watch link for any number of viewers."""

    viewer_id: str
    token: str = Field(description="the link's own secret: read-only access to the session")
    watch_url: str = Field(
        description="the browser page in viewer mode; the token is in the URL's fragment, "
        "which browsers never send to a server"
    )
    stream_url: str = Field(description="the viewers' WebSocket (`?token=` or Bearer)")
    expires_at: datetime


class ViewerInfo(_Schema):
    """One watch link of a session, as its owner sees it (never its token)."""

    viewer_id: str
    expires_at: datetime
    state: Literal["active", "revoked", "expired"]
    connected: int = Field(ge=0, description="viewer connections open with this link")


class ViewerList(_Schema):
    """`GET /v1/sessions/{id}/viewers` reply."""

    viewers: list[ViewerInfo]
    connected: int = Field(ge=0, description="viewer connections open, all links together")


class ErrorBody(_Schema):
    """Body of every REST error: a readable `detail` and, where known, an `ErrorCode`."""

    detail: str
    code: str | None = None


# ----------------------------------------------------------------- server -> client (WS)


class ChunkTimings(_Schema):
    """Where a chunk's time went, in milliseconds."""

    denoise_ms: float = Field(default=0.0, ge=0)
    refresh_ms: float = Field(default=0.0, ge=0)
    decode_ms: float = Field(default=0.0, ge=0)
    encode_ms: float = Field(default=0.0, ge=0)
    queue_ms: float = Field(default=0.0, ge=0)


class HelloMessage(_Schema):
    """First message of every connection."""

    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    session_id: str
    mime: str = Field(description='e.g. video/mp4; codecs="avc1.42C01E"')
    width: int
    height: int
    fps: int
    next_seq: int = Field(
        default=0,
        ge=0,
        description="seq of the first chunk this connection carries; on a resume, chunks "
        "between the client's last one and this were not kept (or were withdrawn)",
    )
    features: list[str] = Field(
        default_factory=list,
        description="optional protocol features enabled on this connection (asked for with "
        "`?features=` on the stream URL): `withdraw` (instant cuts), `viewers` (viewer counts)",
    )
    role: Role = Field(
        default="owner",
        description="`viewer` on a watch connection (read-only: docs/design/protocol.md §15)",
    )
    viewers: int = Field(default=0, ge=0, description="viewer connections watching now")


class InitMessage(_Schema):
    """Announces the binary frame with the fMP4 init segment (once per connection)."""

    type: Literal["init"] = "init"
    bytes: int = Field(ge=0)


class ChunkMessage(_Schema):
    """Announces the binary frame with one media segment; it starts with a keyframe."""

    type: Literal["chunk"] = "chunk"
    seq: int = Field(
        ge=0, description="from 0, increasing; a seq withdrawn by a cut is never used again"
    )
    shot: int = Field(ge=0)
    shot_id: int
    first_frame: int = Field(ge=0)
    frames: int = Field(ge=1)
    pts: float = Field(ge=0, description="seconds")
    duration: float = Field(ge=0, description="seconds")
    bytes: int = Field(ge=0)
    timings: ChunkTimings = Field(default_factory=ChunkTimings)


class ShotMessage(_Schema):
    """A new shot begins at `starts_at_seq`."""

    type: Literal["shot"] = "shot"
    shot_id: int
    shot: int = Field(ge=0)
    prompt: str
    starts_at_seq: int = Field(ge=0)
    truncated_tokens: int = Field(default=0, ge=0)


class PromptAckMessage(_Schema):
    """Answer to a `prompt` message."""

    type: Literal["prompt_ack"] = "prompt_ack"
    shot_id: int
    starts_at_seq: int = Field(ge=0)
    truncated_tokens: int = Field(default=0, ge=0)
    ref: str | None = Field(default=None, description="the prompt's `ref`; absent on re-acks")


class ErrorMessage(_Schema):
    """An error; after a fatal one the server closes with `close_code_for(code)`."""

    type: Literal["error"] = "error"
    code: str
    message: str
    fatal: bool = False
    ref: str | None = Field(default=None, description="the `ref` of the message it answers")


class EndedMessage(_Schema):
    """Sent before a normal close (`reason`: stopped, deleted, expired, ...)."""

    type: Literal["ended"] = "ended"
    reason: str


class PromptDroppedMessage(_Schema):
    """An acknowledged prompt that will never be shown (superseded by a later cut, or the
    session ended), so every ack ends in a `shot` or in this."""

    type: Literal["prompt_dropped"] = "prompt_dropped"
    shot_id: int
    reason: str


class WithdrawMessage(_Schema):
    """Feature `withdraw`: chunks already sent will not be played; a cut replaces them.

    The client removes its buffered media from `pts` on (the start of the first withdrawn
    chunk) and the chunks listed; the next chunk continues the timeline at `pts` (it is the
    first of the new shot, announced by its `shot` message). In order with the media."""

    type: Literal["withdraw"] = "withdraw"
    seqs: list[int] = Field(description="withdrawn chunks this connection was sent")
    pts: float = Field(ge=0, description="seconds: media from here on is withdrawn")
    shot_id: int = Field(description="the cut's prompt, whose shot replaces them")


class ViewersMessage(_Schema):
    """How many viewers watch the session now: sent to viewer connections, and to the
    owner's with feature `viewers`, whenever the count changes."""

    type: Literal["viewers"] = "viewers"
    count: int = Field(ge=0)


class SkippedMessage(_Schema):
    """Viewer connections only: this viewer fell behind, so chunks `seqs` are not sent to
    it; the stream goes on at `next_seq` (a segment that starts with a keyframe). In order
    with the media."""

    type: Literal["skipped"] = "skipped"
    seqs: list[int]
    next_seq: int = Field(ge=0)


class QueuedMessage(_Schema):
    """A session in the waiting room (created with `wait: true`): its place in the queue.
    Sent instead of `hello` until the session starts, then `hello` follows."""

    type: Literal["queued"] = "queued"
    position: int = Field(ge=1, description="1 = the next session to start")
    queue_length: int = Field(ge=1)
    estimated_wait_s: float | None = Field(default=None, ge=0)


class PongMessage(_Schema):
    """Answer to `ping`."""

    type: Literal["pong"] = "pong"
    server_time: float
    ref: str | None = Field(default=None, description="the `ref` of the ping it answers")


# ----------------------------------------------------------------- client -> server (WS)


class _ClientMessage(_Schema):
    ref: str | None = Field(
        default=None,
        max_length=64,
        description="client correlation id, echoed in the `prompt_ack` or `error` answering it",
    )


class PromptMessage(_ClientMessage):
    """A new shot prompt; answered by `prompt_ack`."""

    type: Literal["prompt"] = "prompt"
    prompt: Text
    mode: Mode | None = None


class PauseMessage(_ClientMessage):
    type: Literal["pause"] = "pause"


class ResumeMessage(_ClientMessage):
    type: Literal["resume"] = "resume"


class StopMessage(_ClientMessage):
    type: Literal["stop"] = "stop"


class PingMessage(_ClientMessage):
    type: Literal["ping"] = "ping"


class PlayheadMessage(_ClientMessage):
    """Feature `withdraw`: where the client's player is, in seconds of the media timeline
    (the `pts` of what it is showing now). A cut withdraws only chunks past it. Send a few
    times a second while playing; a value the server did not send is an error, ignored."""

    type: Literal["playhead"] = "playhead"
    pts: float = Field(ge=0, allow_inf_nan=False)


ServerMessage: TypeAlias = Annotated[
    HelloMessage
    | InitMessage
    | ChunkMessage
    | ShotMessage
    | PromptAckMessage
    | ErrorMessage
    | EndedMessage
    | PromptDroppedMessage
    | WithdrawMessage
    | ViewersMessage
    | SkippedMessage
    | QueuedMessage
    | PongMessage,
    Field(discriminator="type"),
]
ClientMessage: TypeAlias = Annotated[
    PromptMessage | PauseMessage | ResumeMessage | StopMessage | PingMessage | PlayheadMessage,
    Field(discriminator="type"),
]

SERVER_MESSAGE_TYPES: dict[str, type[BaseModel]] = {
    m.model_fields["type"].default: m
    for m in (
        HelloMessage,
        InitMessage,
        ChunkMessage,
        ShotMessage,
        PromptAckMessage,
        ErrorMessage,
        EndedMessage,
        PromptDroppedMessage,
        WithdrawMessage,
        ViewersMessage,
        SkippedMessage,
        QueuedMessage,
        PongMessage,
    )
}
CLIENT_MESSAGE_TYPES: dict[str, type[BaseModel]] = {
    m.model_fields["type"].default: m
    for m in (PromptMessage, PauseMessage, ResumeMessage, StopMessage, PingMessage, PlayheadMessage)
}

server_message_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)
client_message_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


# -------------------------------------------------------------------- parsing and limits


@dataclass(frozen=True)
class ProtocolError:
    """Why a message was rejected: an `ErrorCode` and a short readable message."""

    code: str
    message: str
    ref: str | None = None  # the rejected message's `ref`, when one could be read from it

    def to_message(self, fatal: bool = False) -> ErrorMessage:
        return ErrorMessage(code=self.code, message=self.message, fatal=fatal, ref=self.ref)


class LimitError(ValueError):
    """A request over a configured limit (REST answers 422 with `message`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def validate_create(req: CreateSessionRequest, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a create request against the configured limits; raises LimitError."""
    _check_prompt("prompt", req.prompt, limits)
    if len(req.shots) > limits.max_shots:
        raise LimitError(
            ErrorCode.TOO_MANY_SHOTS,
            f"{len(req.shots)} shots given; the limit is {limits.max_shots}",
        )
    for i, shot in enumerate(req.shots):
        _check_prompt(f"shots[{i}]", shot, limits)


def validate_prompt(req: PromptRequest | PromptMessage, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a mid-stream prompt (REST or WebSocket) against the limits; raises LimitError."""
    _check_prompt("prompt", req.prompt, limits)


def _check_prompt(name: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_prompt_chars:
        raise LimitError(
            ErrorCode.PROMPT_TOO_LONG,
            f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}",
        )


def parse_client_message(
    data: str | bytes, limits: Limits = DEFAULT_LIMITS
) -> ClientMessage | ProtocolError:
    """Parse one client WebSocket frame; bad input becomes a ProtocolError, never an exception."""
    if isinstance(data, bytes | bytearray | memoryview):
        return ProtocolError(ErrorCode.BINARY_NOT_ALLOWED, "clients send JSON text frames only")
    obj = _load_object(data, limits.max_message_bytes)
    if isinstance(obj, ProtocolError):
        return obj
    ref = obj.get("ref")
    ref = ref if isinstance(ref, str) and len(ref) <= 64 else None
    msg = _validate(obj, CLIENT_MESSAGE_TYPES)
    if isinstance(msg, ProtocolError):
        return ProtocolError(msg.code, msg.message, ref)
    if isinstance(msg, PromptMessage):
        try:
            validate_prompt(msg, limits)
        except LimitError as exc:
            return ProtocolError(exc.code, exc.message, ref)
    return msg  # type: ignore[return-value]


def parse_server_message(data: str, max_bytes: int | None = None) -> ServerMessage | ProtocolError:
    """Parse one server text frame (for clients); an unknown `type` from a newer server is
    returned as a ProtocolError with code `unknown_type`, which clients may skip."""
    obj = _load_object(data, max_bytes)
    if isinstance(obj, ProtocolError):
        return obj
    return _validate(obj, SERVER_MESSAGE_TYPES)  # type: ignore[return-value]


def _load_object(data: Any, max_bytes: int | None) -> dict[str, Any] | ProtocolError:
    if not isinstance(data, str):
        return ProtocolError(ErrorCode.BAD_MESSAGE, "expected a JSON text frame")
    # Characters never outnumber UTF-8 bytes, so only encode when the length is ambiguous.
    if max_bytes is not None and (
        len(data) > max_bytes
        or (len(data) * 4 > max_bytes and len(data.encode("utf-8", "surrogatepass")) > max_bytes)
    ):
        return ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE, f"message over the limit of {max_bytes} bytes"
        )
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        return ProtocolError(ErrorCode.BAD_JSON, f"malformed JSON: {_short(str(exc))}")
    if not isinstance(obj, dict):
        return ProtocolError(ErrorCode.BAD_MESSAGE, 'a message must be a JSON object with "type"')
    return obj


def _validate(obj: dict[str, Any], types: dict[str, type[BaseModel]]) -> BaseModel | ProtocolError:
    kind = obj.get("type")
    if not isinstance(kind, str):
        return ProtocolError(ErrorCode.BAD_MESSAGE, 'missing "type" string')
    model = types.get(kind)
    if model is None:
        known = ", ".join(sorted(types))
        return ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown message type {_short(kind)!r}; known: {known}"
        )
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        return ProtocolError(
            ErrorCode.BAD_MESSAGE, f"bad {kind!r} message: {describe_validation_error(exc)}"
        )


def describe_validation_error(exc: ValidationError, max_errors: int = 3) -> str:
    """One readable line per field ("prompt: Input should be a valid string"), no input echo."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for err in errors[:max_errors]:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for our ValueErrors
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > max_errors:
        parts.append(f"and {len(errors) - max_errors} more")
    return "; ".join(parts)


def _short(text: str, limit: int = 60) -> str:
    """Bound what we echo back, so an error never repeats a huge input."""
    return text if len(text) <= limit else text[:limit] + "..."
