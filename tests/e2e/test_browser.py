"""The browser page (`GET /`) in headless Debian Chromium, driven by Playwright, against a
real `shotstream serve` (tiny preset, CPU, 127.0.0.1): it plays the stream through Media
Source Extensions, shows a prompt typed mid-stream from the chunk the server acked, shows
the random-weights notice, plays on after its socket drops, shows a superseded cut as
dropped, and ends the session visibly on a fatal server error; its Share button makes a
watch link that a second page opens in viewer mode (the video, the shot timeline, the
viewer count, no prompt box) and whose Download button saves the recording; on a full
server it waits in line, saying its place. Against a `demo` preset server it lists the
prompt vocabulary the model learned.

Screenshots land in `artifacts/` at the repo root: `browser-page.png` (the page with the
new shot on screen) and one per test at teardown (its last state, useful when it fails).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.support.server import REPO, ServerProcess, ffprobe_frames

# Debian's chromium (.ci/system-deps); Playwright never downloads a browser here.
CHROMIUM = Path(os.environ.get("SHOTSTREAM_CHROMIUM", "/usr/bin/chromium"))
# The flags of docs/design/media.md §8. Playwright adds --headless and a fresh --user-data-dir
# itself.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "artifacts"
FRAME_S = 1 / 16
# Small bounds on played video kept in the MSE buffer, so trimming happens within the test.
PAGE_QUERY = "?back_buffer_s=4&trim_to_s=2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # realtime_margin: admission must not refuse a session on a slow shared CPU;
    # fault_injection: the last test makes the server fail a session.
    srv = ServerProcess(
        tmp_path_factory.mktemp("srv"),
        chunks_per_shot=3,
        max_sessions=2,
        realtime_margin=50,
        fault_injection=True,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run `make system-deps` (Debian package chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server, request):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server.base + "/" + PAGE_QUERY)
    yield pg
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=ARTIFACTS / f"browser-{request.node.name}.png", full_page=True)
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def snapshot(page: Page) -> dict:
    return page.evaluate("window.shotstream.snapshot()")


def wait_for(page: Page, predicate: str, timeout_s: float = 30.0) -> None:
    """Wait until `predicate` (JS, with `s` bound to the page's snapshot) holds."""
    try:
        page.wait_for_function(
            f"(() => {{ const s = window.shotstream.snapshot(); return !!s && ({predicate}); }})()",
            timeout=timeout_s * 1000,
        )
    except PlaywrightTimeout:
        s = snapshot(page) or {}
        seen = {
            k: s.get(k) for k in ("state", "endReason", "currentTime", "ranges", "hellos", "errors")
        }
        raise AssertionError(f"not within {timeout_s} s: {predicate}; page: {seen}") from None


def sample_playback(page: Page, seconds: float) -> list[dict]:
    """currentTime and the video buffered ahead of it, sampled in the page every 100 ms."""
    return page.evaluate(
        """async (ms) => {
            const v = document.getElementById("video");
            const out = [];
            const t0 = performance.now();
            while (performance.now() - t0 < ms) {
                out.push({wall: performance.now() / 1000, t: v.currentTime,
                          ahead: window.shotstream.bufferAhead()});
                await new Promise((r) => setTimeout(r, 100));
            }
            return out;
        }""",
        seconds * 1000,
    )


def assert_plays(samples: list[dict], snap: dict, min_advance_s: float) -> None:
    """The video plays, and every stop is the stream's fault (starved), never the player's.

    On this shared 2-core box the tiny preset makes video at about real time, so the buffer
    ahead is often under a chunk and the player rebuffers now and then while it waits for
    the next segment. So we do not demand zero `waiting` events; we demand:
    - currentTime never goes back, and advances at least `min_advance_s` over the window
      (a frozen or stuttering player fails this);
    - no stall with video in hand: whenever 0.25 s (4 frames) or more was buffered ahead,
      the next 100 ms sample shows playback moved on;
    - every `waiting` event once the first frame has played came with under ~1.5 frames
      buffered ahead, i.e. the player had really run out of video.
    """
    times = [s["t"] for s in samples]
    assert all(b >= a for a, b in zip(times, times[1:], strict=False)), times
    advance = times[-1] - times[0]
    wall = samples[-1]["wall"] - samples[0]["wall"]
    assert advance >= min_advance_s, f"played {advance:.2f} s of video in {wall:.2f} s"
    frozen = [
        (round(a["t"], 3), round(a["ahead"], 3))
        for a, b in zip(samples, samples[1:], strict=False)
        if a["ahead"] >= 0.25 and b["t"] - a["t"] < 0.02
    ]
    assert not frozen, f"playback stood still with video buffered ahead at {frozen}"
    # (a wait before the first frame's end is start-up: the decoder's first output, slow
    # on a busy host, not a stall of a playing video; a viewer's first frame is the one it
    # joined at, not media time 0)
    first_end = snap["firstFrameMediaTime"] + FRAME_S
    waits = [
        w
        for w in snap["waits"]
        if w["wallMs"] > snap["firstFrameWallMs"] and w["currentTime"] >= first_end - 1e-3
    ]
    with_video = [w for w in waits if w["ahead"] > 1.5 * FRAME_S]
    assert not with_video, f"the player waited with video buffered: {with_video}"


def start_session(page: Page, caption: str) -> dict:
    page.fill("#caption", caption)
    page.click("#start")
    wait_for(page, "s.firstFrameMs !== null")
    expect(page.locator("#connection")).to_have_text("streaming")
    return snapshot(page)


def test_page_plays_the_stream_and_shows_a_prompt_from_its_acked_chunk(page: Page):
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("RANDOM weights")
    expect(page.locator("#vocabulary")).to_be_hidden()  # tiny learned no vocabulary

    start_session(page, "a red circle on a blue background")
    samples = sample_playback(page, 6.0)
    assert_plays(samples, snapshot(page), min_advance_s=3.0)

    prompt = "close-up, the circle turns green"
    page.fill("#shot-prompt", prompt)
    page.press("#shot-prompt", "Enter")
    item = page.locator("#timeline li", has_text=prompt)
    expect(item).to_be_visible()  # listed at once, before the server answers
    expect(page.locator("#shot-prompt")).to_have_value("")
    expect(item).to_have_attribute("aria-current", "true", timeout=30_000)
    expect(page.locator("#now-playing")).to_contain_text(prompt)

    s = snapshot(page)
    entry = next(e for e in s["timeline"] if e["prompt"] == prompt)
    ack = [a for a in s["acks"] if a["shot_id"] == entry["shotId"]][-1]  # the latest (re-)ack
    assert entry["startsAtSeq"] == ack["starts_at_seq"]
    chunks = {c["seq"]: c for c in s["chunks"]}
    first = chunks[ack["starts_at_seq"]]
    # the server changed the shot exactly at the acked chunk...
    assert first["shot_id"] == ack["shot_id"]
    # (the chunk before it, as received: with instant cuts seqs the cut withdrew before
    # they were sent never arrive)
    prev = max(seq for seq in chunks if seq < ack["starts_at_seq"])
    assert chunks[prev]["shot_id"] != ack["shot_id"]
    assert any(
        m["shot_id"] == ack["shot_id"]
        and m["prompt"] == prompt
        and m["starts_at_seq"] == ack["starts_at_seq"]
        for m in s["shots"]
    )
    # ...and the page made it current when a frame of that chunk was on screen.
    assert first["pts"] - 1e-3 <= entry["shownMediaTime"] < first["pts"] + first["duration"]
    assert s["currentTime"] >= first["pts"]
    assert len(s["promptLatenciesMs"]) == 1 and s["promptLatenciesMs"][0] > 0
    expect(page.locator('[data-stat="prompt"]')).to_contain_text(" s last")
    expect(page.locator('[data-timings="last"] td').first).not_to_have_text("")

    # A bounded MSE buffer: played video more than back_buffer_s behind the playhead goes.
    wait_for(page, "s.ranges.length > 0 && s.ranges[0][0] > 0")
    s = snapshot(page)
    assert s["currentTime"] - s["ranges"][0][0] <= 4 + 1, s["ranges"]

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "browser-page.png", full_page=True)

    page.click("#stop")
    expect(page.locator("#connection")).to_have_text("ended: stopped")
    expect(page.locator("#start")).to_be_enabled()
    expect(page.locator("#shot-prompt")).to_be_disabled()
    assert snapshot(page)["state"] == "ended"


def test_an_instant_cut_replaces_the_buffered_video_without_a_stall(page: Page):
    """The page asks for instant cuts and reports its playhead: a cut typed mid-stream
    withdraws the buffered video past the playhead (SourceBuffer.remove), the new shot's
    first chunk starts exactly there, playback runs through the cut with no stall and no
    gap, and the page shows the new shot well before the video it replaced would have
    played out."""
    start_session(page, "a red circle on a blue background")
    wait_for(page, "s.bufferAhead > 0.5 && s.currentTime > 1.0")
    assert snapshot(page)["features"] == ["withdraw", "viewers"]
    page.evaluate(
        """() => { const v = document.getElementById("video"); window.__samples = [];
            window.__sampler = setInterval(() => window.__samples.push({wall: performance.now() / 1000,
              t: v.currentTime, ahead: window.shotstream.bufferAhead()}), 100); }"""
    )
    page.wait_for_timeout(1000)
    before = snapshot(page)
    buffered_end = before["ranges"][-1][1]
    prompt = "close-up, the circle turns green"
    page.fill("#shot-prompt", prompt)
    page.press("#shot-prompt", "Enter")
    item = page.locator("#timeline li", has_text=prompt)
    expect(item).to_have_attribute("aria-current", "true", timeout=30_000)
    page.wait_for_timeout(2500)  # play on past the cut
    samples = page.evaluate("() => { clearInterval(window.__sampler); return window.__samples; }")
    s = snapshot(page)
    (w,) = [x for x in s["withdrawals"] if x["shot_id"] == s["acks"][-1]["shot_id"]][-1:]
    ack = next(a for a in s["acks"] if a["shot_id"] == w["shot_id"])
    first = next(c for c in s["chunks"] if c["seq"] == ack["starts_at_seq"])
    # the cut landed inside the video buffered when it was typed, and the new shot starts
    # there on the timeline
    assert before["currentTime"] < w["pts"] < buffered_end
    assert abs(first["pts"] - w["pts"]) < 1e-6
    entry = next(e for e in s["timeline"] if e["prompt"] == prompt)
    assert abs(entry["shownMediaTime"] - w["pts"]) <= FRAME_S + 1e-3
    # no stall through the cut, and one buffered range: no gap where video was removed
    assert_plays(samples, s, min_advance_s=2.5)
    assert len(s["ranges"]) == 1 and s["ranges"][0][0] <= s["currentTime"] <= s["ranges"][0][1]
    # the latency the page measured is the time to the new shot on screen
    latency = s["promptLatenciesMs"][-1] / 1000
    replaced = buffered_end - before["currentTime"]  # what the cut did not have to wait for
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "browser-instant-cut.json").write_text(
        json.dumps({"prompt_to_visible_s": latency, "buffered_ahead_s": replaced})
    )
    assert latency < replaced + 1.0  # it did not wait for the buffered video to play out


def test_page_reconnects_after_its_socket_drops_and_plays_on(page: Page):
    start_session(page, "a yellow square on a black background")
    wait_for(page, "s.chunks.length >= 3 && s.currentTime > 1")
    page.evaluate("window.shotstream.dropConnection()")
    wait_for(page, "s.hellos === 2 && s.state === 'streaming'")
    expect(page.locator('[data-stat="reconnects"]')).to_have_text("1")
    # the new connection's video follows on from the old one's
    wait_for(page, "s.chunks.filter((c) => c.connection === 2).length >= 3")
    before = snapshot(page)
    last_old = max(c["pts"] + c["duration"] for c in before["chunks"] if c["connection"] == 1)
    samples = sample_playback(page, 4.0)
    s = snapshot(page)
    assert_plays(samples, s, min_advance_s=2.0)
    assert s["currentTime"] > last_old + 0.5, (s["currentTime"], last_old)

    seqs = [c["seq"] for c in s["chunks"]]
    assert seqs == sorted(set(seqs)), seqs  # appended in order, none twice
    new = [c for c in s["chunks"] if c["connection"] == 2]
    old_last_seq = max(c["seq"] for c in s["chunks"] if c["connection"] == 1)
    # resumed at the next chunk (or the one after, if a chunk was in flight at the drop)
    assert old_last_seq < new[0]["seq"] <= old_last_seq + 2, seqs
    assert s["errors"] == [], s["errors"]
    expect(page.locator("#connection")).to_have_text(re.compile("^streaming$"))

    page.click("#stop")
    expect(page.locator("#connection")).to_have_text("ended: stopped")


def test_page_shows_a_superseded_cut_as_dropped_and_a_fatal_error_as_the_end(page: Page, server):
    start_session(page, "a green triangle on a white background")
    page.click("#pause")
    expect(page.locator("#connection")).to_have_text("paused")
    expect(page.locator("#resume")).to_be_enabled()
    assert snapshot(page)["paused"]  # the video element pauses with the stream
    # While paused nothing new is planned, so the second cut supersedes the first for sure.
    for prompt in ("first cut, soon replaced", "second cut, the one shown"):
        page.fill("#shot-prompt", prompt)
        page.press("#shot-prompt", "Enter")
    dropped = page.locator("#timeline li", has_text="first cut, soon replaced")
    expect(dropped).to_have_attribute("data-status", "dropped")
    expect(dropped).to_contain_text("superseded")
    page.click("#resume")
    expect(page.locator("#connection")).to_have_text("streaming")
    shown = page.locator("#timeline li", has_text="second cut, the one shown")
    expect(shown).to_have_attribute("aria-current", "true", timeout=30_000)
    s = snapshot(page)
    entry = next(e for e in s["timeline"] if e["prompt"] == "second cut, the one shown")
    # prompt-to-visible leaves out the time the viewer kept the stream paused
    assert 0 < s["promptLatenciesMs"][0] < entry["shownAt"] - entry["sentAt"]

    # The server fails this session's next step: a fatal `error`, then a close.
    r = httpx.post(
        server.base + "/v1/debug/faults",
        json={"session_id": snapshot(page)["sessionId"], "kind": "exception"},
    )
    assert r.status_code == 200, r.text
    banner = page.locator("#error")
    expect(banner).to_be_visible(timeout=30_000)
    expect(banner).to_contain_text("session_failed")
    expect(banner).to_contain_text("generation failed")
    expect(page.locator("#connection")).to_contain_text("failed: session_failed")
    expect(page.locator("#start")).to_be_enabled()
    expect(page.locator("#send-shot")).to_be_disabled()
    s = snapshot(page)
    assert s["state"] == "failed" and s["errors"][-1]["fatal"]
    assert s["reconnects"] == 0  # a failed session is not reconnected to


def test_share_a_watch_link_and_watch_it_read_only_in_another_page(page: Page, browser, tmp_path):
    start_session(page, "a red circle on a blue background")
    page.click("#share")
    box = page.locator("#watch-url")
    expect(box).to_have_value(re.compile(r"/\?watch=[^#]+#token=.+"))
    watch_url = box.input_value()
    assert snapshot(page)["watchUrl"] == watch_url
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    viewer = context.new_page()
    errors: list[str] = []
    viewer.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        viewer.goto(watch_url)
        expect(viewer.locator("#watching")).to_be_visible()
        for owner_only in ("#session-form", "#shot-form", "#pause", "#stop", "#share"):
            expect(viewer.locator(owner_only)).to_be_hidden()
        wait_for(viewer, "s.role === 'viewer' && s.firstFrameMs !== null")
        expect(viewer.locator("#connection")).to_have_text("watching")
        expect(viewer.locator("#viewers")).to_have_text("1 watching")
        expect(page.locator("#viewers")).to_have_text("1 watching")  # the owner is told
        samples = sample_playback(viewer, 4.0)
        assert_plays(samples, snapshot(viewer), min_advance_s=2.0)

        # the owner's new shot reaches the viewer's timeline and screen
        prompt = "close-up, the circle turns green"
        page.fill("#shot-prompt", prompt)
        page.press("#shot-prompt", "Enter")
        item = viewer.locator("#timeline li", has_text=prompt).first  # (then its repeats)
        expect(item).to_have_attribute("aria-current", "true", timeout=30_000)
        expect(viewer.locator("#now-playing")).to_contain_text(prompt)
        mine, theirs = snapshot(viewer), snapshot(page)
        owner_chunks = {c["seq"]: c for c in theirs["chunks"]}
        shared = [c for c in mine["chunks"] if c["seq"] in owner_chunks]
        assert len(shared) >= 3
        for c in shared:  # the same chunks, where the owner had them
            o = owner_chunks[c["seq"]]
            assert (c["shot_id"], c["pts"], c["frames"]) == (o["shot_id"], o["pts"], o["frames"])
        assert mine["acks"] == [] and mine["errors"] == []

        # the viewer saves the recording: an MP4 of the session so far
        with viewer.expect_download() as download:
            viewer.click("#download")
        path = tmp_path / "recording.mp4"
        download.value.save_as(path)
        frames = ffprobe_frames(path)
        assert len(frames) >= 9 and frames[0]["key_frame"] == 1
        ARTIFACTS.mkdir(exist_ok=True)
        viewer.screenshot(path=ARTIFACTS / "browser-viewer.png", full_page=True)

        page.click("#stop")
        expect(viewer.locator("#connection")).to_have_text("ended: stopped")
        assert snapshot(viewer)["reconnects"] == 0
    finally:
        context.close()
    assert not errors, f"uncaught errors in the viewer page: {errors}"


def test_the_page_waits_in_line_on_a_full_server_then_streams(page: Page, server):
    full = []
    while True:  # fill every slot through the API
        r = httpx.post(server.base + "/v1/sessions", json={"prompt": "a grey square"}, timeout=30)
        if r.status_code == 503:
            break
        assert r.status_code == 201, r.text
        full.append(r.json())
    assert full, "another test left the server full"
    try:
        page.fill("#caption", "a blue triangle on a yellow background")
        page.click("#start")
        expect(page.locator("#queue")).to_contain_text("you are number 1 in line")
        expect(page.locator("#connection")).to_have_text("waiting for a slot")
        s = snapshot(page)
        assert s["state"] == "queued" and s["queue"]["position"] == 1
        server.delete(full.pop(0))  # a slot frees: the page's session starts
        wait_for(page, "s.firstFrameMs !== null && s.state === 'streaming'")
        expect(page.locator("#queue")).to_be_hidden()
        expect(page.locator("#connection")).to_have_text("streaming")
        assert snapshot(page)["hellos"] == 1
        page.click("#stop")
        expect(page.locator("#connection")).to_have_text("ended: stopped")
    finally:
        for d in full:
            server.delete(d)


def test_page_lists_the_vocabulary_a_demo_model_learned(browser, tmp_path):
    # a demo-preset weights folder as train-demo exports it (random values: only the
    # vocabulary.json beside them matters here), loaded through the normal strict path
    from model.config import get_preset
    from tests.model.tiny_weights import write_demo_export
    from training.vocab import vocabulary

    folder = write_demo_export(tmp_path / "demo", get_preset("demo"))
    srv = ServerProcess(tmp_path, preset="demo", weights=folder).wait_ready()
    context = browser.new_context()
    pg = context.new_page()
    try:
        pg.goto(srv.base + "/")
        panel = pg.locator("#vocabulary")
        expect(panel).to_be_visible()
        v = vocabulary()
        expect(panel.locator('[data-vocab="global"]')).to_have_text(v["global_caption"])
        expect(panel.locator('[data-vocab="shots"] li')).to_have_text(v["shot_captions"])
        swatches = panel.locator('[data-vocab="colours"] li')
        expect(swatches).to_have_text(list(v["colours"]))
        red = swatches.first.evaluate("e => getComputedStyle(e, '::before').backgroundColor")
        assert red == "rgb({}, {}, {})".format(*v["colours"]["red"])
        expect(panel.locator('[data-vocab="shapes"]')).to_have_text(", ".join(v["shapes"]))
        expect(pg.locator("#notice")).to_be_hidden()  # trained weights: no random notice
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=ARTIFACTS / "browser-vocabulary.png", full_page=True)
        context.close()
        assert srv.stop() == 0, srv.log()[-3000:]
