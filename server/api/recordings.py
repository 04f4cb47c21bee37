"""A session's recording: `GET /v1/sessions/{id}/recording.mp4`, `timeline.json` and
`timeline.vtt` (docs/design/protocol.md §16). Its owner's token or a watch link's."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from server import protocol as P
from server.api.deps import ReadableSession, State
from server.recording import NotRecorded, Recorder
from server.sessions import Refused

router = APIRouter(prefix="/v1/sessions", tags=["recordings"])
ERRORS: dict[int | str, dict] = {401: {"model": P.ErrorBody}, 404: {"model": P.ErrorBody}}
READ_BYTES = 1 << 20


def _recorder(state: State) -> Recorder:
    if state.recorder is None:
        raise Refused(404, P.ErrorCode.NO_RECORDING, "recording is off on this server")
    return state.recorder


def _recording(state: State, sid: str):
    try:
        return _recorder(state).get(sid)
    except NotRecorded as exc:
        raise Refused(404, P.ErrorCode.NO_RECORDING, str(exc)) from exc


@router.api_route(
    "/{sid}/recording.mp4",
    methods=["GET", "HEAD"],
    responses={
        **ERRORS,
        200: {"content": {"video/mp4": {}}},
        206: {"description": "the byte range asked for (`Range: bytes=...`)"},
        416: {"description": "a range past the end; `Content-Range: bytes */SIZE`"},
    },
    response_class=StreamingResponse,
)
async def recording_mp4(s: ReadableSession, state: State, request: Request):
    """The recording as a standard MP4 (index first, a chapter per shot), up to the last
    chunk sent: while the session runs too. `X-Recording-State` says whether it is
    `recording`, `complete` or `incomplete` (see the timeline's `incomplete_reason`).
    One byte range (`Range: bytes=A-B`, `A-`, `-N`) is answered 206, so players can seek
    and a download can resume; `ETag` names these bytes, and a `Range` with an `If-Range`
    naming older bytes (the session went on) gets the whole new file. `HEAD` answers the
    same headers without the body."""
    rec = _recording(state, s.id)
    try:
        fd, size, version = await _recorder(state).mp4(rec)
    except NotRecorded as exc:
        raise Refused(404, P.ErrorCode.NO_RECORDING, str(exc)) from exc
    etag = f'"{s.id}-{version}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{s.id}.mp4"',
        "X-Recording-State": rec.state,
        "Cache-Control": "no-store",
    }
    asked = request.headers.get("range")
    if_range = request.headers.get("if-range")
    span = byte_range(asked, size) if asked and if_range in (None, etag) else None
    if isinstance(span, str):  # "unsatisfiable"
        os.close(fd)
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end, status = (0, size - 1, 200) if span is None else (*span, 206)
    headers["Content-Length"] = str(end - start + 1)
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD":  # the same headers, no body
        os.close(fd)
        return Response(status_code=status, media_type="video/mp4", headers=headers)
    return StreamingResponse(
        _read(fd, start, end - start + 1),
        status_code=status,
        media_type="video/mp4",
        headers=headers,
    )


def byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """The one byte range of a `Range` header as (first, last) inclusive, clipped to the
    file; "unsatisfiable" if it starts past the end; None (send it all) if the header is
    not a single well-formed `bytes` range, which RFC 9110 lets a server ignore."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first == "" or _digits(first)) or not (last == "" or _digits(last)):
        return None
    if not first:  # the last N bytes
        if not last:
            return None
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else "unsatisfiable"
    a, b = int(first), (int(last) if last else size - 1)
    if a >= size:
        return "unsatisfiable"
    if b < a:
        return None
    return a, min(b, size - 1)


def _digits(x: str) -> bool:
    return x.isascii() and x.isdigit()


async def _read(fd: int, offset: int, length: int) -> AsyncIterator[bytes]:
    """`length` bytes of the open file from `offset` (it may be deleted meanwhile: the
    descriptor keeps it)."""
    try:
        while length > 0:
            chunk = await asyncio.to_thread(os.pread, fd, min(READ_BYTES, length), offset)
            if not chunk:
                break
            offset += len(chunk)
            length -= len(chunk)
            yield chunk
    finally:
        os.close(fd)


@router.get("/{sid}/timeline.json", responses=ERRORS)
async def timeline_json(s: ReadableSession, state: State):
    """The recording's shots: prompt, mode, seq range, start and end in the video, when
    each was shown; `state` and `incomplete_reason` say whether it is whole."""
    rec = _recording(state, s.id)
    return JSONResponse(_recorder(state).timeline(rec), headers={"Cache-Control": "no-store"})


@router.get("/{sid}/timeline.vtt", responses={**ERRORS, 200: {"content": {"text/vtt": {}}}})
async def timeline_vtt(s: ReadableSession, state: State):
    """The timeline as WebVTT chapters (a cue per shot, its prompt the title)."""
    rec = _recording(state, s.id)
    return PlainTextResponse(
        _recorder(state).webvtt(rec), media_type="text/vtt", headers={"Cache-Control": "no-store"}
    )
