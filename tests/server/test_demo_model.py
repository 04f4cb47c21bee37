"""End to end on a real server running the `demo` preset with its bundled trained weights:
`GET /v1/models` names the vocabulary the model learned, and a prompt sent mid-stream that
recolours the object shows the new colour from the acked `seq` on, read by the pixel probe
from the decoded video (what a viewer sees), not from the model's tensors."""

from __future__ import annotations

import asyncio
import io
import json

import av
import httpx
import numpy as np
import pytest

from model.config import get_preset
from tests.support.server import ServerProcess, StreamClient
from training.probe import read_chunk
from training.vocab import PALETTE, SHAPES

SHIPPED = get_preset("demo").bundled_weights_dir
pytestmark = pytest.mark.skipif(
    SHIPPED is None or not SHIPPED.is_dir(),
    reason="no shipped demo weights (train-demo makes them)",
)

GLOBAL = "a red square on a blue background"
FIRST_SHOT = "wide shot, the square stays still"
SWITCH = "close-up shot, the square turns yellow and stays still"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("srv"), preset="demo", max_sessions=2, realtime_margin=50
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def decode_rgb(data: bytes) -> np.ndarray:
    """Every frame of an fMP4 byte string as (T, H, W, 3) uint8 RGB, decoded by PyAV."""
    with av.open(io.BytesIO(data), format="mp4") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_models_reports_trained_weights_and_their_vocabulary(server):
    info = httpx.get(server.base + "/v1/models", timeout=10).json()
    assert info["preset"] == "demo" and info["real_weights"] is True
    assert info["notice"] is None  # no random-weights warning
    assert info["weights"] == "bundled demo weights"  # a name: no path on the server's disk
    vocab = info["vocabulary"]
    assert {k: tuple(v) for k, v in vocab["colours"].items()} == PALETTE
    assert vocab["shapes"] == list(SHAPES)
    assert vocab["global_caption"] == "a {colour} {shape} on a {colour} background"


def test_the_log_is_json_lines_only(server):
    """Everything the server wrote to stdout and stderr up to ready, weight loading included
    (transformers draws a progress bar there), is one JSON object per line."""
    lines = server.log().splitlines()
    assert lines and all(line.startswith("{") and json.loads(line) for line in lines), [
        line for line in lines if not line.startswith("{")
    ]
    assert any(e["event"] == "ready" for e in map(json.loads, lines))


def _stream(server, shots: list[str], switch: str, seed: int, after: int):
    """One stream: `shots` for two chunks, then `switch` sent mid-stream; returns the ack and,
    per seq, the probe's reading of the decoded video's frames of that chunk."""
    d = server.create(prompt=shots[0], shots=[shots[1]], seed=seed)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(2)
            await c.send({"type": "prompt", "prompt": switch})
            ack = await c.until(lambda m: m["type"] == "prompt_ack")
            last = ack["starts_at_seq"] + after - 1
            await c.until(lambda m: m["type"] == "chunk" and m["seq"] >= last)
            await c.send({"type": "stop"})
            return ack, await c.closed()

    ack, st = asyncio.run(go())
    frames = decode_rgb(st.video())
    assert len(frames) == sum(c.message["frames"] for c in st.chunks)
    seen = {}
    for c in st.chunks:
        first, n = c.message["first_frame"], c.message["frames"]
        seen[c.message["seq"]] = read_chunk(frames[first : first + n])
    return ack["starts_at_seq"], seen


# Every seed of 0-9, none picked: measured through the generator on the shipped weights, this
# scenario's colours were right in every chunk for all ten (the first version: 7 of 10).
@pytest.mark.parametrize("seed", range(10))
def test_midstream_colour_switch_shows_from_the_acked_seq(server, seed):
    start, seen = _stream(server, [GLOBAL, FIRST_SHOT], SWITCH, seed, after=2)
    colours = {s: (r.background, r.colour) for s, r in seen.items()}
    before = [colours[s] for s in colours if s < start]
    after = [colours[s] for s in colours if s >= start]
    assert len(before) >= 2 and len(after) >= 2, colours
    # the colours are what the switch is about; the shape is read right less often (see the
    # model card), so it is not asserted here
    assert all(c == ("blue", "red") for c in before), colours
    # the new colour from the acked seq on, the first chunk of the new shot included
    assert all(c == ("blue", "yellow") for c in after), colours


def _moves(server, seed: int, shots: list[str], switch: str) -> tuple[float, float, float]:
    """A still shot, then `switch` sent mid-stream: the centroid's travel (dx, dy) over the
    three chunks from the acked seq on, and how far it wandered in the still shot."""
    start, seen = _stream(server, shots, switch, seed, after=3)
    path = [f.centre for s in sorted(seen) if s >= start for f in seen[s].frames if f.centre]
    still = [f.centre for s in sorted(seen) if s < start for f in seen[s].frames if f.centre]
    assert len(path) >= 20 and still, seen
    wander = max(max(c[i] for c in still) - min(c[i] for c in still) for i in (0, 1))
    return path[-1][0] - path[0][0], path[-1][1] - path[0][1], wander


# A still shot, then a shot that moves right sent mid-stream: from the acked seq on, the
# object's centroid travels right (every seed of 0-9; measured through the generator on the
# shipped weights: 24.1 to 24.6 pixels over the three chunks, 25 asked for; the first version
# stood still).
@pytest.mark.parametrize("seed", range(10))
def test_midstream_motion_moves_the_object_from_the_acked_seq(server, seed):
    shots = ["a green circle on a black background", "wide shot, the circle stays still"]
    dx, dy, wander = _moves(server, seed, shots, "wide shot, the circle moves right")
    assert dx > 8.0 and abs(dy) < 4.0, (dx, dy)  # right, and not up or down
    assert wander < 4.0  # the still shot stood


# The same for vertical motion, which the crossing layout made the model follow (measured
# through the generator on the shipped weights, every seed of 0-9: 28.7 to 29.3 pixels up,
# 29 asked for; the fourth version moved it 2 to 10 pixels in nine seeds of ten).
@pytest.mark.parametrize("seed", range(10))
def test_midstream_vertical_motion_moves_the_object_up(server, seed):
    shots = ["a white circle on a orange background", "close-up shot, the circle stays still"]
    dx, dy, wander = _moves(server, seed, shots, "wide shot, the circle moves up")
    assert dy < -8.0 and abs(dx) < 4.0, (dx, dy)  # up, and not sideways
    assert wander < 4.0


# And down (0.99 of chunks on the held-out stories, the other directions 1.00; the model
# card): measured through the generator on the shipped weights, every seed of 0-9, 28.5 to
# 29.7 pixels down, 29 asked for.
@pytest.mark.parametrize("seed", range(10))
def test_midstream_vertical_motion_moves_the_object_down(server, seed):
    shots = ["a yellow triangle on a magenta background", "wide shot, the triangle stays still"]
    dx, dy, wander = _moves(server, seed, shots, "wide shot, the triangle moves down")
    assert dy > 8.0 and abs(dx) < 4.0, (dx, dy)  # down, and not sideways
    assert wander < 4.0
