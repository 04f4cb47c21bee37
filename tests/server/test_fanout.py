"""The fan-out to viewers (server/fanout.py) on made-up items: a viewer behind skips to the
latest chunk with its shot and is told; a withdrawal drops what a viewer was not yet sent;
a viewer joining starts at the current shot's `shot` message and the latest chunk."""

from __future__ import annotations

import asyncio

from server.delivery import MediaItem
from server.fanout import Audience, ViewerConnection


def shot(shot_id: int, seq: int) -> MediaItem:
    return MediaItem({"type": "shot", "shot_id": shot_id, "starts_at_seq": seq}, seq=seq)


def chunk(seq: int, shot_id: int) -> MediaItem:
    msg = {"type": "chunk", "seq": seq, "shot_id": shot_id, "pts": seq * 0.75, "duration": 0.75}
    return MediaItem(msg, b"segment %d" % seq, seq, 12, 0.75)


def withdraw(seqs: list[int], pts: float, seq: int) -> MediaItem:
    return MediaItem({"type": "withdraw", "seqs": seqs, "pts": pts, "shot_id": 9}, seq=seq)


def viewer(withdraw_feature: bool = False) -> ViewerConnection:
    async def make() -> ViewerConnection:  # its wake event wants a running loop
        noop = lambda *a: None  # noqa: E731
        c = ViewerConnection(noop, noop, noop, 0.0)
        c.withdraw = withdraw_feature
        return c

    return asyncio.run(make())


def kinds(c: ViewerConnection) -> list[tuple[str, int]]:
    return [(x.message["type"], x.seq) for x in c.queue]


def test_a_viewer_behind_skips_to_the_latest_chunk_and_is_told():
    c = viewer()
    items = [shot(0, 0), chunk(0, 0), chunk(1, 0), shot(1, 2), chunk(2, 1), chunk(3, 1)]
    skipped = [c.offer(x, limit=3) for x in items]
    assert skipped == [[], [], [], [], [], [0, 1, 2]]
    assert kinds(c) == [("skipped", 3), ("shot", 2), ("chunk", 3)]
    assert c.queue[0].message == {"type": "skipped", "seqs": [0, 1, 2], "next_seq": 3}
    assert c.queue[-1].data is items[-1].data  # the same bytes, not a copy
    assert c.skipped == 3
    # a shot whose chunk was skipped but not the latest's is not kept
    c2 = viewer()
    for x in [shot(0, 0), chunk(0, 0), shot(1, 1), chunk(1, 1), chunk(2, 1)]:
        c2.offer(x, limit=2)
    assert kinds(c2) == [("skipped", 2), ("shot", 1), ("chunk", 2)]


def test_a_withdrawal_drops_unsent_chunks_and_reaches_only_viewers_that_take_cuts():
    plain, cuts = viewer(), viewer(withdraw_feature=True)
    for c in (plain, cuts):
        for x in [chunk(4, 1), chunk(5, 1), chunk(6, 1)]:
            c.offer(x, limit=8)
        c.offer(withdraw([5, 6], 3.75, 7), limit=8)
    assert kinds(plain) == [("chunk", 4)]
    assert kinds(cuts) == [("chunk", 4), ("withdraw", 7)]


def test_a_viewer_joins_at_the_current_shot_and_the_latest_chunk():
    a = Audience()
    for x in [shot(0, 0), chunk(0, 0), chunk(1, 0), shot(1, 2), chunk(2, 1), chunk(3, 1)]:
        a.deliver(x, limit=4)
    assert [(x.message["type"], x.seq) for x in a.join] == [("shot", 2), ("chunk", 3)]
    # a cut inside the latest chunk: a viewer that takes cuts also gets the withdraw
    a.deliver(withdraw([], 2.5, 4), limit=4)
    assert [x.message["type"] for x in a.join_items(viewer(True))] == ["shot", "chunk", "withdraw"]
    assert [x.message["type"] for x in a.join_items(viewer())] == ["shot", "chunk"]
    # a cut that withdrew the latest chunk leaves nothing to join at until the next shot
    a.deliver(withdraw([3], 2.25, 4), limit=4)
    assert a.join == []
