"""A session's recording: `GET /v1/sessions/{id}/recording.mp4`, `timeline.json` and
`timeline.vtt` (docs/design/protocol.md §16). Its owner's token or a watch link's."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

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


@router.get(
    "/{sid}/recording.mp4",
    responses={**ERRORS, 200: {"content": {"video/mp4": {}}}},
    response_class=StreamingResponse,
)
async def recording_mp4(s: ReadableSession, state: State):
    """The recording as a standard MP4 (index first, a chapter per shot), up to the last
    chunk sent: while the session runs too. `X-Recording-State` says whether it is
    `recording`, `complete` or `incomplete` (see the timeline's `incomplete_reason`)."""
    rec = _recording(state, s.id)
    try:
        fd, size = await _recorder(state).mp4(rec)
    except NotRecorded as exc:
        raise Refused(404, P.ErrorCode.NO_RECORDING, str(exc)) from exc
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{s.id}.mp4"',
        "X-Recording-State": rec.state,
        "Cache-Control": "no-store",
    }
    return StreamingResponse(_read(fd), media_type="video/mp4", headers=headers)


async def _read(fd: int) -> AsyncIterator[bytes]:
    """The open file, to its end (it may be deleted meanwhile: the descriptor keeps it)."""
    try:
        while chunk := await asyncio.to_thread(os.read, fd, READ_BYTES):
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
