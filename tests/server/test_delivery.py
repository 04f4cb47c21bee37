"""The outbox and the playout clock on their own (no sockets, no model)."""

from __future__ import annotations

import pytest

from server.delivery import CONTROL_LIMIT, MediaItem, Outbox, PlayoutClock


def chunk(seq: int, frames: int = 12, duration: float = 0.75) -> MediaItem:
    return MediaItem({"type": "chunk", "seq": seq}, b"s" * 10, seq, frames, duration)


def shot(seq: int, index: int) -> MediaItem:
    return MediaItem({"type": "shot", "shot": index}, None, seq)


def test_an_item_counts_once_when_sent_whole():
    box = Outbox(keep=4)
    items = [shot(0, 0), chunk(0), chunk(1)]
    box.media.extend(items)
    assert [box.sent_whole(x) for x in items] == [False, True, True]
    assert not box.media and box.shown_shot == 0
    assert (box.chunks_delivered, box.frames_sent, box.bytes_sent) == (2, 24, 20)
    assert box.video_sent == pytest.approx(1.5) and box.last_delivered_seq == 1


def test_resume_settles_what_the_client_holds_and_replays_what_it_may_have_missed():
    box = Outbox(keep=4)
    for seq in range(3):
        box.media.append(chunk(seq))
        box.sent_whole(box.media[0])
    box.media.extend([chunk(3), chunk(4)])  # 3 went out whole but its sender died before popping
    box.control.append({"type": "pong"})
    settled = box.resume_after(last_seq=3)  # the client holds 0..3
    assert [x.seq for x in settled] == [3] and box.chunks_delivered == 4
    assert [x.seq for x in box.media] == [4] and not box.control  # replies to the dead socket go
    # a client that holds only up to 1 gets 2 again, as a replay not counted twice
    box2 = Outbox(keep=4)
    for seq in range(3):
        box2.media.append(chunk(seq))
        box2.sent_whole(box2.media[0])
    box2.resume_after(last_seq=1)
    assert [(x.seq, x.replay) for x in box2.media] == [(2, True)]
    assert box2.sent_whole(box2.media[0]) is False and box2.chunks_delivered == 3
    assert box2.first_media_seq() == 3


def test_a_resuming_player_holds_the_media_up_to_its_last_seq():
    def timed(seq: int) -> MediaItem:  # chunk seq plays from 0.75 seq to 0.75 (seq + 1)
        item = chunk(seq)
        item.message.update(pts=0.75 * seq, duration=0.75)
        return item

    box = Outbox(keep=4)
    for seq in range(3):
        box.media.append(timed(seq))
        box.sent_whole(box.media[0])
    box.media.append(timed(3))  # out whole, not yet popped
    assert box.held_end(None) == 0.0  # a fresh player holds nothing
    assert box.held_end(1) == pytest.approx(1.5)
    assert box.held_end(3) == pytest.approx(3.0)
    assert box.held_end(9) == pytest.approx(3.0)


def test_a_fresh_player_starts_at_the_first_undelivered_chunk():
    box = Outbox(keep=4)
    assert box.first_media_seq() == 0
    box.media.append(chunk(0))
    box.sent_whole(box.media[0])
    box.resume_after(None)
    assert box.first_media_seq() == 1
    box.media.extend([shot(1, 1), chunk(1)])
    assert box.first_media_seq() == 1


def test_control_lane_is_bounded():
    box = Outbox(keep=4)
    assert all(box.push_control({"type": "pong"}) for _ in range(CONTROL_LIMIT))
    assert not box.push_control({"type": "pong"}) and len(box.control) == CONTROL_LIMIT


def test_playout_clock_counts_stalls_and_stands_still_while_paused():
    clock = PlayoutClock()
    assert not clock.running
    assert clock.on_delivered(10.0, 0.75) == 0.0  # the first chunk starts the player
    assert clock.on_delivered(10.5, 0.75) == 0.0  # in time: due at 10.75
    assert clock.runs_dry(0.0) == pytest.approx(11.5)
    assert clock.on_delivered(12.0, 0.75) == pytest.approx(0.5)  # ran dry at 11.5
    assert clock.runs_dry(0.0) == pytest.approx(12.75)
    clock.pause(13.0)
    clock.resume(15.0)  # two seconds paused: the player is two seconds later
    assert clock.runs_dry(0.75) == pytest.approx(15.5)
    clock.reset()
    assert not clock.running
