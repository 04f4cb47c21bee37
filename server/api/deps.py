"""What routes share: the app's state, session authentication, error responses, the client."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from server import protocol as P
from server.fanout import ViewerLink
from server.sessions import Refused, Session, SessionManager
from server.state import AppState


def error_response(
    status: int, code: str | None, detail: str, retry_after: float | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse(
        P.ErrorBody(detail=detail, code=code).model_dump(), status_code=status, headers=headers
    )


def bearer(headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def client_key(request: Request) -> str:
    """Who a per-client quota counts: the client's address (one API key is shared by all
    callers, so it names no one; nor does any part of it belong in a log)."""
    return "ip:" + (request.client.host if request.client else "unknown")


def app_state(request: Request) -> AppState:
    return request.app.state.shotstream


def manager(request: Request) -> SessionManager:
    """The session manager, or 503 while the server is still starting."""
    m = app_state(request).manager
    if m is None:
        raise Refused(503, P.ErrorCode.OVER_CAPACITY, "server is starting", retry_after=5)
    return m


def _reader(sid: str, request: Request) -> tuple[Session, ViewerLink | None]:
    token = bearer(request.headers)
    if token is None:
        raise Refused(401, P.ErrorCode.UNAUTHORIZED, "missing 'Authorization: Bearer <token>'")
    found = manager(request).find_reader(sid, token)
    if found is None:
        raise Refused(404, P.ErrorCode.UNKNOWN_SESSION, f"no session {sid!r} for this token")
    return found


def authed_session(sid: str, request: Request) -> Session:
    """The session named in the path, for the bearer token of its owner; 401 / 404 else
    (403 for one of its watch links' tokens: they only read). An unknown session and a
    wrong token look the same: a session is visible only with its token."""
    s, link = _reader(sid, request)
    if link is not None:
        raise Refused(
            403, P.ErrorCode.FORBIDDEN, "a watch link can read this session, not change it"
        )
    return s


def readable_session(sid: str, request: Request) -> Session:
    """The session named in the path, for its owner's token or a live watch link's."""
    return _reader(sid, request)[0]


State = Annotated[AppState, Depends(app_state)]
Manager = Annotated[SessionManager, Depends(manager)]
OwnedSession = Annotated[Session, Depends(authed_session)]
ReadableSession = Annotated[Session, Depends(readable_session)]
