"""Session routes: create, read, prompt, pause, resume, delete, and the watch links of
docs/design/protocol.md §15 (protocol v1 REST)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import protocol as P
from server.api.deps import Manager, OwnedSession, ReadableSession, State, bearer, client_key
from server.sessions import Refused

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
AUTH_ERRORS: dict[int | str, dict] = {401: {"model": P.ErrorBody}, 404: {"model": P.ErrorBody}}
OWNER_ERRORS: dict[int | str, dict] = {**AUTH_ERRORS, 403: {"model": P.ErrorBody}}


def base_urls(state: State, request: Request) -> tuple[str, str]:
    """The base URL clients reach us at, and its WebSocket form (ws:// or wss://)."""
    base = state.settings.public_url or str(request.base_url).rstrip("/")
    return base, base.replace("https://", "wss://").replace("http://", "ws://")


def check_api_key(state: State, request: Request) -> None:
    """With an API key set, creating a session needs it (Bearer or X-API-Key)."""
    key = state.settings.api_key
    if not key:
        return
    given = bearer(request.headers) or request.headers.get("x-api-key")
    if not given or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode()):
        raise Refused(401, P.ErrorCode.UNAUTHORIZED, "a valid API key is needed to create sessions")


@router.post(
    "",
    status_code=201,
    response_model=P.CreateSessionResponse,
    responses={
        202: {"model": P.CreateSessionResponse, "description": "queued: the server is full"},
        422: {"model": P.ErrorBody},
        429: {"model": P.ErrorBody},
        503: {"model": P.ErrorBody},
    },
)
async def create_session(
    req: P.CreateSessionRequest, request: Request, response: Response, state: State, m: Manager
):
    """A new session (`201`); with `wait: true` on a full server, a session in the waiting
    room (`202`, state `queued`) that starts when a slot frees (docs/design/protocol.md §17)."""
    check_api_key(state, request)
    client = client_key(request)
    # Behind the shipped proxy, its first pass over the replicas says not to queue (so a
    # replica with a free slot is found first); its second pass lets one queue.
    may_wait = req.wait and request.headers.get("x-shotstream-enqueue") != "0"
    queued = m.admit(client, wait=may_wait)
    s, cut = await m.create(client, req, queued=queued)
    _, ws_base = base_urls(state, request)
    cfg = m.cfg
    return P.CreateSessionResponse(
        session_id=s.id,
        token=s.token,
        stream_url=f"{ws_base}/v1/sessions/{s.id}/stream",
        expires_at=m.expires_at(s),
        grace_s=state.settings.session_grace_s,
        preset=cfg.name,
        width=cfg.width,
        height=cfg.height,
        fps=cfg.fps,
        truncated_tokens=cut,
        **_queued(s, m, response),
    )


def _queued(s, m: Manager, response: Response) -> dict:
    """A session still in the waiting room: 202 and its place."""
    info = m.queue_info(s) if s.state == "queued" else None
    if info is None:
        return {}
    response.status_code = 202
    return {"state": "queued", "queue_position": info[0], "estimated_wait_s": info[2]}


@router.get("/{sid}", response_model=P.SessionStatus, responses=AUTH_ERRORS)
async def get_session(s: ReadableSession, m: Manager):
    """The session's state; its owner's token or a watch link's."""
    return m.status(s)


@router.post(
    "/{sid}/prompts",
    status_code=202,
    response_model=P.PromptAccepted,
    responses={
        **OWNER_ERRORS,
        409: {"model": P.ErrorBody},
        422: {"model": P.ErrorBody},
        429: {"model": P.ErrorBody},
    },
)
async def post_prompt(req: P.PromptRequest, s: OwnedSession, m: Manager):
    p = await m.add_prompt(s, req.prompt, req.mode)
    ack = P.PromptAckMessage(
        shot_id=p.shot_id, starts_at_seq=p.starts_at_seq, truncated_tokens=p.report.truncated_tokens
    )
    m.send_control(s, ack)  # the stream's timeline learns of it too
    return P.PromptAccepted(
        shot_id=p.shot_id, starts_at_seq=p.starts_at_seq, truncated_tokens=p.report.truncated_tokens
    )


@router.delete("/{sid}", status_code=204, responses=OWNER_ERRORS)
async def delete_session(s: OwnedSession, m: Manager):
    m.end(s, "deleted")
    return Response(status_code=204)


@router.post("/{sid}/pause", status_code=204, responses=OWNER_ERRORS)
async def pause_session(s: OwnedSession, m: Manager):
    """Stop generating (the stream's player should pause too); same as the `pause` message."""
    m.pause(s)
    return Response(status_code=204)


@router.post(
    "/{sid}/resume", status_code=204, responses={**OWNER_ERRORS, 409: {"model": P.ErrorBody}}
)
async def resume_session(s: OwnedSession, m: Manager):
    """Resume a paused session; same as the `resume` message."""
    m.resume(s)
    return Response(status_code=204)


# -- watch links (docs/design/protocol.md §15) ----------------------------------------------
@router.post(
    "/{sid}/viewers",
    status_code=201,
    response_model=P.ViewerLink,
    responses={**OWNER_ERRORS, 409: {"model": P.ErrorBody}, 429: {"model": P.ErrorBody}},
)
async def create_viewer(
    s: OwnedSession,
    m: Manager,
    state: State,
    request: Request,
    req: P.CreateViewerRequest | None = None,
):
    """Mint a watch link: any number of viewers watch the same stream with its token."""
    link = m.mint_viewer(s, req.ttl_s if req else None)
    base, ws_base = base_urls(state, request)
    return P.ViewerLink(
        viewer_id=link.id,
        token=link.token,
        watch_url=f"{base}/?watch={s.id}#token={link.token}",
        stream_url=f"{ws_base}/v1/sessions/{s.id}/watch",
        expires_at=link.expires_at,
    )


@router.get("/{sid}/viewers", response_model=P.ViewerList, responses=OWNER_ERRORS)
async def list_viewers(s: OwnedSession, m: Manager):
    """The session's watch links (never their tokens) and how many viewers each has."""
    return m.viewers(s)


@router.delete("/{sid}/viewers/{viewer_id}", status_code=204, responses=OWNER_ERRORS)
async def revoke_viewer(viewer_id: str, s: OwnedSession, m: Manager):
    """Revoke a watch link: its token stops working and its viewers are closed."""
    m.revoke_viewer(s, viewer_id)
    return Response(status_code=204)
