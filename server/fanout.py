"""Viewers: the watch links a session's owner mints, and the fan-out of its stream to them.

The owner's connection paces generation (docs/design/scheduling.md §3–§4); viewers get what
the owner's sender delivered, in the same order: `shot`, `chunk` with its segment (the same
bytes object, encoded once and never copied) and `withdraw`. Each viewer connection has its
own small queue and its own sender task, so a slow viewer only waits for itself: more than
`viewer_queue_chunks` chunks behind, it skips to the latest chunk (every segment starts with
a keyframe, so it decodes alone) and is told (`skipped`); one whose socket accepts nothing
for `viewer_stall_s` is closed. Everything here runs on the event loop. See
docs/design/protocol.md §15.
"""

from __future__ import annotations

import hmac
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from server import protocol as P
from server.delivery import CONTROL_LIMIT, Connection, MediaItem
from server.media import with_decode_time

KEEP_SENT_SEQS = 64  # chunks a viewer was sent that a later `withdraw` may name


@dataclass(eq=False)
class ViewerLink:
    """A watch link: its own secret, read-only, revocable, with an expiry."""

    id: str
    token: str
    expires_mono: float
    expires_at: datetime
    revoked: bool = False
    conns: list[ViewerConnection] = field(default_factory=list)

    def state(self, now: float) -> Literal["active", "revoked", "expired"]:
        if self.revoked:
            return "revoked"
        return "expired" if now >= self.expires_mono else "active"


@dataclass(eq=False)
class ViewerConnection(Connection):
    """One viewer's stream connection: its own lanes, fed by the session's fan-out."""

    link: ViewerLink | None = None  # None: the owner's own token, watching read-only
    queue: deque[MediaItem] = field(default_factory=deque)  # media, in order
    control: deque[dict[str, Any]] = field(default_factory=deque)  # pongs, errors, counts
    sent_seqs: deque[int] = field(default_factory=lambda: deque(maxlen=KEEP_SENT_SEQS))
    skipped: int = 0  # chunks skipped because this viewer was behind
    # A viewer without `withdraw` keeps what a cut withdrew (it cannot remove it): later
    # chunks are moved on its timeline past what it holds, `frame_shift` frames later, so
    # its video stays continuous, as a version-1 cut behind the buffer plays.
    frame_shift: int = 0

    def place(self, msg: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        """The chunk message and segment as this viewer gets them (see `frame_shift`)."""
        if self.withdraw:
            return msg, data
        fps = round(msg["frames"] / msg["duration"])  # the session's (integer) frame rate
        held = round(self.sent_end_pts * fps)  # frames this viewer was sent, to their end
        first = msg["first_frame"] + self.frame_shift
        if first < held:
            self.frame_shift += held - first
            first = held
        if first == msg["first_frame"]:
            return msg, data
        placed = {**msg, "first_frame": first, "pts": first / fps}
        return placed, with_decode_time(data, first)

    __hash__ = object.__hash__  # identity: a connection is itself, whatever its fields

    def push_control(self, msg: dict[str, Any]) -> None:
        if len(self.control) < CONTROL_LIMIT:
            self.control.append(msg)
        self.wake.set()

    def offer(self, item: MediaItem, limit: int) -> list[int]:
        """Queue a delivered item for this viewer; returns the chunks skipped to keep at
        most `limit` queued (the latest chunk is kept, with its shot's `shot` message and
        any `withdraw` before it)."""
        kind = item.message["type"]
        if kind == "withdraw":
            # Withdrawn chunks not yet sent to this viewer are simply not sent; one that
            # takes instant cuts is told what to remove of what it was sent.
            gone = set(item.message["seqs"])
            self.queue = deque(
                x for x in self.queue if x.message["type"] == "withdraw" or x.seq not in gone
            )
            if self.withdraw:
                self.queue.append(item)
            self.wake.set()
            return []
        self.queue.append(item)
        self.wake.set()
        chunks = [x for x in self.queue if x.data is not None]
        if len(chunks) <= limit:
            return []
        latest = chunks[-1]
        items = list(self.queue)
        at = items.index(latest)
        withdrawals = [x for x in items[:at] if x.message["type"] == "withdraw"]
        shots = [
            x
            for x in items[:at]
            if x.message["type"] == "shot"
            and x.message.get("shot_id") == latest.message.get("shot_id")
        ]
        skipped = [x.seq for x in chunks[:-1]]
        note = P.SkippedMessage(seqs=skipped, next_seq=latest.seq).model_dump()
        self.queue = deque(
            [*withdrawals, MediaItem(note, seq=latest.seq), *shots[-1:], *items[at:]]
        )
        self.skipped += len(skipped)
        return skipped

    def queued_bytes(self) -> int:
        return sum(len(x.data) for x in self.queue if x.data is not None)


class Audience:
    """A session's watch links and viewer connections, and where a new viewer joins."""

    def __init__(self) -> None:
        self.links: dict[str, ViewerLink] = {}
        self.conns: list[ViewerConnection] = []
        # What a viewer joining now is sent first: the current shot's `shot` message and
        # the latest chunk the owner was sent (and the `withdraw` that cut into it, if any).
        self.join: list[MediaItem] = []

    def find(self, token: str) -> ViewerLink | None:
        """The link whose secret is `token` (compared in constant time with every link)."""
        given = token.encode("utf-8", "surrogatepass")
        found = None
        for link in self.links.values():
            if hmac.compare_digest(link.token.encode(), given):
                found = link
        return found

    def live_links(self, now: float) -> list[ViewerLink]:
        return [x for x in self.links.values() if x.state(now) == "active"]

    def prune(self, now: float, keep: int) -> None:
        """Forget the oldest revoked or expired links past `keep` of them (so their holders
        still get a clear `unauthorized` for a while, in bounded memory)."""
        dead = [k for k, x in self.links.items() if x.state(now) != "active" and not x.conns]
        for k in dead[: max(0, len(dead) - keep)]:
            del self.links[k]

    def deliver(self, item: MediaItem, limit: int) -> int:
        """The owner was sent `item` whole: remember the join point, queue it for every
        viewer. Returns the chunks skipped by viewers that were behind."""
        msg = item.message
        kind = msg["type"]
        if kind == "shot":
            self.join = [item]
        elif kind == "chunk":
            self.join = [
                x
                for x in self.join
                if x.message["type"] == "shot" and x.message.get("shot_id") == msg.get("shot_id")
            ] + [item]
        elif kind == "withdraw":
            gone = set(msg["seqs"])
            self.join = [x for x in self.join if x.seq not in gone]
            chunk = next((x for x in self.join if x.data is not None), None)
            if chunk is None:
                self.join = []  # the new shot's `shot` message and chunk come next
            elif chunk.message["pts"] + chunk.message["duration"] > msg["pts"] + 1e-9:
                self.join.append(item)  # the cut fell inside it: its tail is withdrawn
        return sum(len(c.offer(item, limit)) for c in self.conns)

    def join_items(self, conn: ViewerConnection) -> list[MediaItem]:
        """The items a viewer joining now starts with."""
        return [x for x in self.join if x.message["type"] != "withdraw" or conn.withdraw]

    def close_all(self, messages: list[dict[str, Any]], code: int, reason: str) -> None:
        """Send each viewer `messages` after what is queued for it, then close it."""
        for c in self.conns:
            for m in messages:
                c.control.append(m)
            c.close_after_flush(code, reason)
