"""Load generator: N concurrent sessions for T seconds, prompts at random (seeded) times.

    python -m clients.load --server http://127.0.0.1:8000 --sessions 4 --duration 30
    shotstream-client load --sessions 4 --duration 30

Prints ONE JSON line of what the clients saw; `run_load(LoadConfig(...))` returns the same
dict for benchmarks and reliability tests. Loopback servers only unless `allow_remote`: a
load generator pointed at someone else's server by mistake is an attack. The server's
per-client quota (default 4) applies: start it with `--max-sessions-per-client N`.

Measured on the client: TTFF is from `POST /v1/sessions` to the first chunk's media; a
deadline miss models a player that starts at a session's first chunk and plays at real
time: a chunk that arrives after that player ran dry is a miss, and the player stalls until
it arrives. Prompt-to-visible is from sending a prompt to the moment that player shows the
first frame of the shot it was acknowledged as (not when its chunk arrives: a chunk behind
buffered video is seen only when the video before it has played). With `instant_cuts`, the
sessions ask for the `withdraw` feature: they report that player's position four times a
second, and a cut replaces the buffered video past it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from clients.client import (
    Chunk,
    ConnectionLost,
    Error,
    Hello,
    Overloaded,
    PromptDropped,
    RateLimited,
    Reconnected,
    Session,
    ShotStreamClient,
    ShotStreamError,
    Withdraw,
)
from clients.stats import Playout, summary

MAX_SESSIONS = 256
MAX_DURATION_S = 3600.0

CAPTIONS = [
    "a red fox crosses a snowy forest at dawn",
    "a sailing boat on a calm sea under a cloudy sky",
    "a street market in the rain, people with umbrellas",
    "a cat explores an old library full of books",
]
SHOTS = [
    "wide shot, the scene from far away",
    "close-up shot, slow camera push in",
    "medium shot, the camera pans left",
    "overhead shot, looking straight down",
    "low angle shot, the camera tilts up",
    "tracking shot, following the subject",
]


@dataclass(frozen=True)
class LoadConfig:
    """One load run; `validate()` enforces the bounds and the loopback rule."""

    server: str = "http://127.0.0.1:8000"
    sessions: int = 2
    duration_s: float = 10.0
    prompt_every_s: float = 4.0  # mean seconds between one session's prompts; 0: no prompts
    mode: Literal["cut", "queue"] = "cut"
    seed: int = 0
    ramp_s: float = 0.0  # spread session starts over this many seconds
    retry_refused: bool = True  # after a 429/503, wait its Retry-After and try again
    api_key: str | None = None
    allow_remote: bool = False
    timeout_s: float = 30.0
    instant_cuts: bool = False  # feature `withdraw`: cuts at the modelled player's position

    def validate(self) -> None:
        """Raise ValueError for a run out of bounds or aimed at a non-loopback server."""
        if not 1 <= self.sessions <= MAX_SESSIONS:
            raise ValueError(f"sessions must be 1..{MAX_SESSIONS}, got {self.sessions}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(
                f"duration must be in (0, {MAX_DURATION_S:g}] s, got {self.duration_s}"
            )
        if self.prompt_every_s < 0 or self.ramp_s < 0:
            raise ValueError("prompt_every_s and ramp_s must not be negative")
        if not self.allow_remote and not is_loopback(self.server):
            raise ValueError(
                f"{self.server} is not a loopback address; pass --allow-remote "
                "(allow_remote=True) only for a server you run"
            )


def is_loopback(url: str) -> bool:
    """True if every address the URL's host resolves to is a loopback address."""
    host = urlsplit(url).hostname
    if not host:
        return False
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


@dataclass
class _Totals:
    """What all sessions saw, merged as they go."""

    started: int = 0
    refused: Counter = field(default_factory=Counter)  # HTTP status -> refusals
    retry_after: list[float] = field(default_factory=list)
    chunks: int = 0
    frames: int = 0
    video_s: float = 0.0
    ttff: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    misses: int = 0
    stalled_s: float = 0.0
    prompts_sent: int = 0
    prompts_dropped: int = 0
    p2v: list[float] = field(default_factory=list)
    withdrawn_frames: int = 0
    reconnects: int = 0
    errors: Counter = field(default_factory=Counter)


async def _create(
    i: int,
    cfg: LoadConfig,
    client: ShotStreamClient,
    rng: random.Random,
    end: float,
    totals: _Totals,
) -> tuple[Session, float] | None:
    """A session and when its successful request was sent, retrying refusals after their
    Retry-After while the run lasts."""
    while time.monotonic() < end:
        sent = time.monotonic()
        try:
            session = await client.create_session(
                rng.choice(CAPTIONS),
                shots=[rng.choice(SHOTS)],
                seed=rng.randrange(2**31),
                mode=cfg.mode,
                features=("withdraw",) if cfg.instant_cuts else (),
            )
            if time.monotonic() >= end:
                # Admitted only after the run ended (a retry sent just before the end, let in
                # once a session of this run stopped): it never streamed within the run.
                with contextlib.suppress(ShotStreamError, TimeoutError):
                    await session.delete()
                return None
            return session, sent
        except (RateLimited, Overloaded) as exc:
            totals.refused[str(exc.status)] += 1
            if exc.retry_after is not None:
                totals.retry_after.append(exc.retry_after)
            wait = exc.retry_after if exc.retry_after is not None else 1.0
            if not cfg.retry_refused or time.monotonic() + wait >= end:
                return None
            await asyncio.sleep(wait)
        except ShotStreamError as exc:
            totals.errors[f"create_{exc.code or exc.status or type(exc).__name__}"] += 1
            return None
    return None


async def _run_session(
    i: int, cfg: LoadConfig, client: ShotStreamClient, end: float, totals: _Totals
) -> None:
    rng = random.Random(cfg.seed * 1_000_003 + i)  # one stream of choices per session
    await asyncio.sleep(cfg.ramp_s * i / cfg.sessions)
    got = await _create(i, cfg, client, rng, end, totals)
    if got is None:
        return
    session, created = got
    totals.started += 1
    playout = Playout()
    sent: dict[int, float] = {}  # shot_id -> when its prompt was sent
    first_chunk: dict[int, float] = {}  # shot_id -> when the player shows its first frame
    last: float | None = None
    first_pts: float | None = None  # media time of the player's first frame
    fps = 16

    async def reporter() -> None:
        while cfg.instant_cuts:
            await asyncio.sleep(0.25)
            if first_pts is not None:
                await session.report_playhead(first_pts + playout.played_s(time.monotonic()))

    async def prompter() -> None:
        if cfg.prompt_every_s <= 0:
            return
        while True:
            await asyncio.sleep(rng.expovariate(1 / cfg.prompt_every_s))
            t0 = time.monotonic()
            try:
                acc = await session.prompt(rng.choice(SHOTS), cfg.mode, timeout=10)
            except ShotStreamError as exc:
                totals.errors[f"prompt_{exc.code or type(exc).__name__}"] += 1
                continue
            except TimeoutError:
                totals.errors["prompt_timeout"] += 1
                continue
            totals.prompts_sent += 1
            sent[acc.shot_id] = t0

    async def consume() -> None:
        nonlocal last, first_pts, fps
        async for ev in session.stream():
            if isinstance(ev, Hello):
                fps = ev.message.fps
            elif isinstance(ev, Withdraw):
                cut = round(ev.message.pts * fps)
                gone = max(0, round(((first_pts or 0.0) + playout.received_s) * fps) - cut)
                totals.withdrawn_frames += gone
                playout.withdraw(gone / fps)
                totals.frames -= gone
                totals.video_s -= gone / fps
            if isinstance(ev, Chunk):
                totals.chunks += 1
                totals.frames += ev.frames
                totals.video_s += ev.duration
                if last is None:
                    totals.ttff.append(ev.received - created)
                else:
                    totals.gaps.append(ev.received - last)
                last = ev.received
                if first_pts is None:
                    first_pts = ev.message.pts
                playout.on_chunk(ev.received, ev.duration)
                if ev.shot_id not in first_chunk:  # when the player reaches it
                    shown = playout.visible_at(ev.message.pts - first_pts) or ev.received
                    first_chunk[ev.shot_id] = max(shown, ev.received)
            elif isinstance(ev, PromptDropped):
                totals.prompts_dropped += 1
            elif isinstance(ev, Reconnected):
                totals.reconnects += 1
            elif isinstance(ev, Error):
                totals.errors[f"server_{ev.message.code}"] += 1

    tasks: list[asyncio.Task] = []
    try:
        await session.connect()
        tasks += [
            asyncio.create_task(consume()),
            asyncio.create_task(prompter()),
            asyncio.create_task(reporter()),
        ]
        done, _ = await asyncio.wait(tasks[:1], timeout=max(0.0, end - time.monotonic()))
        if done:
            tasks[0].result()  # ended early: raises the stream's error, if any
            totals.errors["ended_early"] += 1
    except ConnectionLost:
        totals.errors["connection_lost"] += 1
    except ShotStreamError as exc:
        totals.errors[exc.code or type(exc).__name__] += 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _stop(session)
    totals.misses += playout.misses
    totals.stalled_s += playout.stalled_s
    totals.p2v += [first_chunk[sid] - t for sid, t in sent.items() if sid in first_chunk]


async def _stop(session: Session) -> None:
    """End the session and read to its `ended` (bounded), so the server frees it now."""
    with contextlib.suppress(ShotStreamError, TimeoutError):
        await session.stop()
        async with asyncio.timeout(5):
            while await session.next_event() is not None:
                pass
    await session.close()


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Run the load and return its measurements (the JSON line's fields)."""
    cfg.validate()
    totals = _Totals()
    t0 = time.monotonic()
    end = t0 + cfg.duration_s
    async with ShotStreamClient(cfg.server, api_key=cfg.api_key, timeout=cfg.timeout_s) as client:
        await asyncio.gather(
            *(_run_session(i, cfg, client, end, totals) for i in range(cfg.sessions))
        )
    ra = totals.retry_after
    return {
        **{k: v for k, v in asdict(cfg).items() if k not in ("api_key", "allow_remote")},
        "wall_s": round(time.monotonic() - t0, 3),
        "sessions_started": totals.started,
        "sessions_refused": sum(totals.refused.values()),
        "refused_by_status": dict(totals.refused),
        "retry_after_s": {"min": min(ra), "max": max(ra)} if ra else None,
        "chunks": totals.chunks,
        "frames": totals.frames,
        "video_s": round(totals.video_s, 3),
        "ttff_s": summary(totals.ttff, (50, 95)),
        "inter_chunk_gap_s": summary(totals.gaps, (50, 95, 99)),
        "deadline_misses": totals.misses,
        "stalled_s": round(totals.stalled_s, 3),
        "prompts_sent": totals.prompts_sent,
        "prompts_visible": len(totals.p2v),
        "prompts_dropped": totals.prompts_dropped,
        "prompt_to_visible_s": summary(totals.p2v, (50, 95)),
        "withdrawn_frames": totals.withdrawn_frames,
        "reconnects": totals.reconnects,
        "errors": dict(totals.errors),
    }


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The load generator's flags (shared by `python -m clients.load` and the CLI)."""
    d = LoadConfig()
    p.add_argument(
        "--server",
        default=os.environ.get("SHOTSTREAM_SERVER", d.server),
        help=f"server base URL (default: $SHOTSTREAM_SERVER or {d.server})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("SHOTSTREAM_API_KEY"),
        help="API key for creating sessions (default: $SHOTSTREAM_API_KEY)",
    )
    p.add_argument(
        "--sessions", type=int, default=d.sessions, help=f"concurrent sessions (1..{MAX_SESSIONS})"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=d.duration_s,
        help=f"seconds to run (at most {MAX_DURATION_S:g})",
    )
    p.add_argument(
        "--prompt-every",
        type=float,
        default=d.prompt_every_s,
        metavar="SECONDS",
        help="mean seconds between a session's prompts (random, seeded); 0: none",
    )
    p.add_argument("--mode", choices=["cut", "queue"], default=d.mode, help="prompt mode")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of prompt times and texts")
    p.add_argument(
        "--ramp",
        type=float,
        default=d.ramp_s,
        metavar="SECONDS",
        help="spread session starts over this many seconds",
    )
    p.add_argument(
        "--no-retry",
        action="store_true",
        help="a refused session (429/503) is not retried after its Retry-After",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a server that is not on this machine (only one you run)",
    )
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="HTTP timeout, s")
    p.add_argument(
        "--instant-cuts",
        action="store_true",
        help="ask for instant cuts (feature withdraw): report the modelled "
        "player's position; a cut replaces the buffered video past it",
    )


def main_load(args: argparse.Namespace) -> int:
    """Run from parsed arguments; print one JSON line."""
    cfg = LoadConfig(
        server=args.server,
        sessions=args.sessions,
        duration_s=args.duration,
        prompt_every_s=args.prompt_every,
        mode=args.mode,
        seed=args.seed,
        ramp_s=args.ramp,
        retry_refused=not args.no_retry,
        api_key=args.api_key,
        allow_remote=args.allow_remote,
        timeout_s=args.timeout,
        instant_cuts=args.instant_cuts,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"shotstream-client load: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(run_load(cfg))), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m clients.load`."""
    p = argparse.ArgumentParser(prog="python -m clients.load", description=__doc__.split("\n")[0])
    add_load_arguments(p)
    return main_load(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
