"""Prometheus metrics of one server process (names and units per Prometheus conventions).

Each app owns its registry, so several servers can live in one process (tests). Latency
buckets span tens of milliseconds to seconds: the real-time budget of a chunk is 0.75 s.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

# No `*_created` series: they double the series count and name nothing anyone graphs
# (`shotstream_sessions_created_created`). Process-wide, as prometheus_client allows.
disable_created_metrics()

LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
)
VERB_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.35,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
SEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

VERBS = ("text", "context", "prefill", "denoise", "refresh", "decode", "package")
# Label values known up front are exported at 0 from the start, so `rate()` and the
# dashboard see a series before the first event.
REFUSE_REASONS = ("capacity", "quota", "draining", "not_ready", "queue_full")
END_REASONS = (
    "deleted",
    "stopped",
    "idle",
    "expired",
    "failed",
    "draining",
    "shutdown",
    "wait_timeout",
)
WAIT_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
ERROR_KINDS = (
    "step",
    "oom",
    "encode",
    "engine",
    "slow_reader",
    "flood",
    "slow_viewer",
    "viewer_limit",
) + tuple(
    "client_" + code  # bad client input (protocol.ErrorCode), counted per message
    for code in (
        "bad_json",
        "bad_message",
        "unknown_type",
        "message_too_large",
        "binary_not_allowed",
        "prompt_too_long",
        "prompt_too_many_tokens",
        "too_many_shots",
        "invalid_state",
        "rate_limited",
        "bad_playhead",
        "forbidden",
    )
)
DROP_REASONS = ("superseded", "session")  # a later cut; the session ended
CONNECTION_CLOSE_REASONS = ("request_timeout", "over_limit")  # server/connections.py
RECORDING_STOP_REASONS = ("disk_full", "budget", "write_error")  # server/recording.py


class Metrics:
    """The server's metrics; `sample` callbacks fill the gauges at scrape time."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttff = Histogram(
            "shotstream_time_to_first_frame_seconds",
            "Stream connection to the first chunk sent on it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_chunk_gap = Histogram(
            "shotstream_inter_chunk_gap_seconds",
            "Time between consecutive chunks sent to one stream.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_to_visible = Histogram(
            "shotstream_prompt_to_visible_seconds",
            "A prompt received to the first chunk of its shot sent.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verb_duration = Histogram(
            "shotstream_verb_duration_seconds",
            "Duration of one hot-path verb for one chunk or shot boundary.",
            ["verb"],
            buckets=VERB_BUCKETS,
            registry=r,
        )
        self.ws_send = Histogram(
            "shotstream_ws_send_seconds",
            "Time to send one chunk (message and media segment) on a WebSocket.",
            buckets=SEND_BUCKETS,
            registry=r,
        )
        self.sessions_created = Counter(
            "shotstream_sessions_created_total", "Sessions created.", registry=r
        )
        self.queue_wait = Histogram(
            "shotstream_queue_wait_seconds",
            "Time a session waited in the waiting room before it started.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.sessions_queued = Counter(
            "shotstream_sessions_queued_total",
            "Sessions created into the waiting room (the replica was full).",
            registry=r,
        )
        self.sessions_refused = Counter(
            "shotstream_sessions_refused_total",
            "Session creations refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.sessions_ended = Counter(
            "shotstream_sessions_ended_total", "Sessions ended, by reason.", ["reason"], registry=r
        )
        self.chunks = Counter("shotstream_chunks_generated_total", "Chunks generated.", registry=r)
        self.frames = Counter(
            "shotstream_frames_generated_total", "Pixel frames generated.", registry=r
        )
        self.frames_sent = Counter(
            "shotstream_frames_sent_total", "Pixel frames sent to clients.", registry=r
        )
        self.bytes_sent = Counter(
            "shotstream_bytes_sent_total", "Media bytes (init and segments) sent.", registry=r
        )
        self.deadline_misses = Counter(
            "shotstream_deadline_misses_total",
            "Chunks sent after the client's player would have run dry.",
            registry=r,
        )
        self.prompts_received = Counter(
            "shotstream_prompts_received_total",
            "Shot prompts accepted (at creation or mid-stream).",
            registry=r,
        )
        self.prompts_applied = Counter(
            "shotstream_prompts_applied_total",
            "Shot prompts that became a visible shot.",
            registry=r,
        )
        self.prompts_dropped = Counter(
            "shotstream_prompts_dropped_total",
            "Accepted prompts that never became a shot, by reason.",
            ["reason"],
            registry=r,
        )
        self.chunks_withdrawn = Counter(
            "shotstream_chunks_withdrawn_total",
            "Chunks withdrawn by instant cuts before they were played (sent or not).",
            registry=r,
        )
        self.frames_withdrawn = Counter(
            "shotstream_frames_withdrawn_total",
            "Frames withdrawn by instant cuts, including the tails of chunks cut inside.",
            registry=r,
        )
        self.viewer_bytes_sent = Counter(
            "shotstream_viewer_bytes_sent_total",
            "Media bytes (init and segments) sent to viewers: the fan-out, encoded once.",
            registry=r,
        )
        self.viewer_chunks_skipped = Counter(
            "shotstream_viewer_chunks_skipped_total",
            "Chunks not sent to a viewer that fell behind (it skipped to the latest chunk).",
            registry=r,
        )
        self.recordings_incomplete = Counter(
            "shotstream_recordings_incomplete_total",
            "Recordings stopped before their session ended (the stream went on), by reason.",
            ["reason"],
            registry=r,
        )
        self.errors = Counter("shotstream_errors_total", "Errors, by kind.", ["kind"], registry=r)
        self.connections_closed = Counter(
            "shotstream_connections_closed_total",
            "HTTP connections the server closed before a complete request, by reason.",
            ["reason"],
            registry=r,
        )
        for labelled, values in (
            (self.verb_duration, VERBS),
            (self.sessions_refused, REFUSE_REASONS),
            (self.sessions_ended, END_REASONS),
            (self.prompts_dropped, DROP_REASONS),
            (self.errors, ERROR_KINDS),
            (self.connections_closed, CONNECTION_CLOSE_REASONS),
            (self.recordings_incomplete, RECORDING_STOP_REASONS),
        ):
            for value in values:
                labelled.labels(value)
        self.build_info = Info(
            "shotstream_build", "Version, preset, device, torch, attention backend.", registry=r
        )
        self._samplers: list[Callable[[], list[GaugeMetricFamily]]] = []
        r.register(_Sampled(self._samplers))

    def add_sampler(self, fn: Callable[[], list[GaugeMetricFamily]]) -> None:
        """Register a callback that returns gauge families, evaluated at every scrape."""
        self._samplers.append(fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Sampled:
    """A collector whose gauges come from callbacks at scrape time."""

    def __init__(self, samplers: list[Callable[[], list[GaugeMetricFamily]]]):
        self._samplers = samplers

    def collect(self):
        for fn in self._samplers:
            yield from fn()

    def describe(self):
        return []


def gauge(
    name: str,
    doc: str,
    value: float | None = None,
    labels: dict[str, float] | None = None,
    label: str = "kind",
) -> GaugeMetricFamily:
    """A gauge family with one value, or one value per label."""
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value or 0.0)
    fam = GaugeMetricFamily(name, doc, labels=[label])
    for key, v in labels.items():
        fam.add_metric([key], v)
    return fam
