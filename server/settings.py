"""Server settings: command-line flags and `SHOTSTREAM_*` environment variables.

Every limit of docs/design/protocol.md §13 is here with its default. The README's
configuration table is generated from this class (`python -m server.settings --markdown`),
so the two never drift.
"""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import default_preset


class Settings(BaseSettings):
    """All settings of one server process."""

    model_config = SettingsConfigDict(env_prefix="SHOTSTREAM_", extra="ignore")

    # -- model -----------------------------------------------------------------------
    preset: str = Field(
        "demo",
        description="model preset: `demo` (bundled weights trained on procedural shapes, "
        "CPU), `tiny` (random weights) or `wan2.1-1.3b` (the default when weights are given)",
    )
    weights: str | None = Field(
        None,
        description="weights folder (real weights); none = the preset's bundled weights "
        "(`demo`) or random ones (`tiny`)",
    )
    device: str = Field("auto", description="`auto` (CUDA if present), `cuda`, `cuda:N` or `cpu`")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="`auto`: bfloat16 on CUDA, float32 on CPU"
    )
    attention: str = Field("auto", description="attention backend: `auto`, `sdpa` or `xformers`")
    seed: int = Field(0, description="seed of random weights (presets run without real weights)")
    chunks_per_shot: int = Field(
        0,
        description="chunks per shot before a shot continues anew (0 = the preset's: 7 = 81 frames)",
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off",
        description="torch.compile the DiT with this mode (compiled at warm-up; for CUDA hosts)",
    )
    threads: int = Field(0, description="torch CPU threads (0 = torch default)")

    # -- HTTP ------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    api_key: str | None = Field(
        None,
        description="if set, `POST /v1/sessions` needs `Authorization: Bearer <api_key>` or "
        "`X-API-Key`; visible ASCII only (`!` to `~`), else the server does not start",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="allowed CORS origins (empty: same-origin only)"
    )
    public_url: str | None = Field(
        None,
        description="base URL clients reach us at (for `stream_url`); default from the request",
    )
    trusted_proxies: str = Field(
        "127.0.0.1",
        description="addresses whose X-Forwarded-For is believed for the client address (per-client quota); `*` for all, `` for none",
    )
    replica_id: str = Field(
        "r0",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="stable id of this replica (a DNS label, e.g. the pod name); session ids start with it, so a proxy routes each session to its owner",
    )
    http_request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection must deliver each request, headers and body, within this "
        "many seconds of opening (or of the request's first byte, when kept alive), else it "
        "is closed (slowloris)",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="open connections (HTTP and WebSocket) at most; past it a new one closes "
        "the one that has waited longest for a complete request, or gets 503 if all are busy "
        "(0 = the open-file limit minus 64, at most 4096)",
    )

    # -- sessions and limits ---------------------------------------------------------
    max_sessions: int = Field(
        0, description="hard cap on concurrent sessions (0 = from measured capacity only)"
    )
    max_sessions_per_client: int = Field(
        4, description="concurrent sessions per client (IP or API key); over it: 429"
    )
    session_grace_s: float = Field(
        30.0, description="a session with no stream connection for this long is ended and freed"
    )
    session_max_s: float = Field(3600.0, description="hard lifetime of a session (token expiry)")
    max_prompt_chars: int = Field(8000, description="longest prompt text accepted (characters)")
    max_shots_per_request: int = Field(
        16, description="most shot prompts in one `POST /v1/sessions`"
    )
    max_queued_prompts: int = Field(16, description="most prompts waiting in a session's queue")
    prompt_overflow: Literal["truncate", "reject", "fit"] = Field(
        "truncate",
        description="over the text encoder's token limit: `truncate` (as the original), `reject` (422), `fit` (shorten the global caption first)",
    )
    prompt_rate: float = Field(
        4.0, description="prompts per second allowed per session (burst of 8)"
    )
    max_ws_message_bytes: int = Field(
        65536, description="largest JSON text frame accepted from a client"
    )
    max_body_bytes: int = Field(262144, description="largest REST request body")
    send_timeout_s: float = Field(
        60.0,
        description="a stream whose reader takes longer than this to accept one message is closed (4408)",
    )
    abuse_limit: int = Field(
        8, description="bad messages tolerated on one connection before it is closed"
    )
    ws_message_rate: float = Field(
        20.0,
        description="messages per second a stream connection may send, of any kind (burst of "
        "twice that); past it messages are dropped unanswered, and past `ws_flood_limit` "
        "dropped ones the connection is closed (4429)",
    )
    ws_flood_limit: int = Field(
        64, description="messages dropped for the rate on one connection before it is closed"
    )
    ws_ping_interval_s: float = Field(
        5.0,
        description="WebSocket ping interval; a connection whose peer does not answer within "
        "`ws_ping_timeout_s` is closed (a frozen client is noticed in about their sum)",
    )
    ws_ping_timeout_s: float = Field(10.0, description="WebSocket pong timeout (see above)")
    resume_window_s: float = Field(
        20.0,
        description="seconds of video already sent that a session keeps, so a client that "
        "resumes (`last_seq`) after its connection died gets again what it may have missed",
    )
    on_shot_end: Literal["continue", "pause"] = Field(
        "continue",
        description="when a shot ends with no queued prompt: start a new shot of the same prompt, or pause",
    )

    # -- the waiting room (docs/design/protocol.md §17) ------------------------------
    queue_max_length: int = Field(
        16,
        ge=0,
        description="sessions waiting for a slot (created with `wait: true` while full); "
        "past it such a request gets 503 like any other (0 = no waiting room)",
    )
    queue_max_wait_s: float = Field(
        300.0,
        gt=0,
        description="a session still waiting this long after it was queued is ended "
        "(reason `wait_timeout`)",
    )

    # -- viewers (docs/design/protocol.md §15) ----------------------------------------
    max_viewers_per_session: int = Field(
        8,
        ge=0,
        description="viewer connections (watch links) open at once on one session; past it a "
        "new one is refused (`viewer_limit`, close 4503)",
    )
    max_viewers: int = Field(
        256, ge=0, description="viewer connections open at once on this server, all sessions"
    )
    max_viewer_links: int = Field(
        16,
        ge=1,
        description="watch links alive per session (not revoked, not expired); past it a "
        "new one gets 429 `viewer_limit`",
    )
    viewer_link_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="how long a watch link is valid: the default, and the most a request "
        "may ask for",
    )
    viewer_queue_chunks: int = Field(
        4,
        ge=1,
        description="chunks queued for one viewer; a viewer further behind skips to the "
        "latest chunk and is told (`skipped`)",
    )
    viewer_stall_s: float = Field(
        10.0,
        gt=0,
        description="a viewer connection that takes longer than this to accept one message "
        "is closed (4408); a viewer never slows the session or other viewers",
    )

    # -- recordings (docs/design/protocol.md §16) -------------------------------------
    recording: bool = Field(
        True,
        description="record what each session's owner is sent (its segments and a shot "
        "timeline) for `GET .../recording.mp4` and `.../timeline.json`",
    )
    recordings_dir: str | None = Field(
        None,
        description="where recordings go (a folder of this process inside it, removed at exit; "
        "one a crashed process left is removed at the next start); none = the system's "
        "temporary folder",
    )
    recording_budget_bytes: int = Field(
        268435456,
        ge=0,
        description="disk for recordings, all sessions together; a session whose next "
        "segment does not fit stops recording (marked incomplete) and streams on",
    )
    recording_retention_s: float = Field(
        600.0, ge=0, description="a recording is deleted this long after its session ended"
    )

    # -- engine ----------------------------------------------------------------------
    cut_margin_s: float = Field(
        0.0,
        description="for viewers that take instant cuts: how far past their playhead a cut "
        "lands (0 = measured: 1.25 x the time a cut's first chunk takes to reach the viewer, "
        "+ 50 ms)",
    )
    max_batch: int = Field(
        4, description="sessions whose chunks may run as one batched forward (1 = never batch)"
    )
    lead_chunks: float = Field(
        2.0, description="how far (in chunks) a session may run ahead of its playout clock"
    )
    outbox_chunks: int = Field(
        4,
        description="chunks buffered per session for a slow reader; past it, its generation pauses",
    )
    stream_send_buffer_bytes: int = Field(
        0,
        description="kernel send buffer of each stream socket (0 = the OS's, autotuned up to "
        "`net.ipv4.tcp_wmem`'s max, often 4 MiB); a stalled reader holds this plus the outbox",
    )
    realtime_margin: float = Field(
        0.85,
        description="admission keeps the sum of sessions' chunk time under this fraction of real time",
    )
    warmup: bool = Field(True, description="generate one chunk before reporting ready")
    drain_grace_s: float = Field(
        5.0,
        description="on SIGTERM, how long connected sessions may continue before they are ended "
        "(never-connected ones end at once); keep it under the platform's stop timeout minus "
        "about 3 s (`docker stop`: 10 s; compose and Kubernetes here set 20 s with 30-35 s)",
    )

    fault_injection: bool = Field(
        False,
        description="TESTS ONLY: enable `POST /v1/debug/faults` to make a session's next step fail",
    )

    # -- logging ---------------------------------------------------------------------
    log_level: str = Field("info", description="log level: debug, info, warning, error")
    log_prompts: bool = Field(False, description="include prompt text in info-level logs")

    @field_validator("weights", "api_key", "public_url", "recordings_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        # `SHOTSTREAM_WEIGHTS=` (e.g. a compose override of an image default) means "none".
        return None if value == "" else value

    @field_validator("api_key")
    @classmethod
    def _api_key_any_client_can_send(cls, value):
        # Clients disagree on the bytes of a non-ASCII header value (browsers and requests
        # send latin-1, curl the terminal's UTF-8, httpx refuses) and a Bearer value ends at
        # a space: any other key would lock every client out.
        if value is not None and not all("!" <= c <= "~" for c in value):
            raise ValueError(
                "must be visible ASCII characters (`!` to `~`): no spaces, no non-ASCII; e.g. `openssl rand -hex 32`"
            )
        return value

    @model_validator(mode="after")
    def _weights_mean_the_real_model(self):
        if "preset" not in self.model_fields_set:
            self.preset = default_preset(self.weights)
        return self


def settings_table() -> str:
    """The README configuration table, from the fields above."""
    rows = ["| setting | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        shown = "—" if default in (None, []) else f"`{default}`"
        flag = f"`--{name.replace('_', '-')}`"
        rows.append(f"| {flag} | `SHOTSTREAM_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m server.settings", description="The server's settings, documented."
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the settings as the README's Markdown table"
    )
    if parser.parse_args().markdown:
        print(settings_table())
    else:
        parser.print_help()
