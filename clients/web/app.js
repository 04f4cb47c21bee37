// The ShotStream page: create a session, play its stream, send shot prompts mid-stream,
// share it with a watch link, download its recording; or, opened with a watch link
// (`/?watch=<session id>#token=<token>`), watch someone else's session read-only.
//
// Modules: stream.js (WebSocket, reconnect), player.js (Media Source Extensions),
// timeline.js (shots and prompts), stats.js (the stats panel). This file wires them to the page.
//
// URL options: ?back_buffer_s=N&trim_to_s=M bound the played video the player keeps
// (default 30 and 10 seconds). `window.shotstream` exposes the page's state for tests.

import { MsePlayer } from "./player.js";
import { Stats } from "./stats.js";
import { StreamSocket } from "./stream.js";
import { Timeline } from "./timeline.js";

const $ = (id) => document.getElementById(id);
const ui = {
  modelInfo: $("model-info"),
  connection: $("connection"),
  notice: $("notice"),
  error: $("error"),
  errorCode: $("error-code"),
  errorMessage: $("error-message"),
  sessionForm: $("session-form"),
  caption: $("caption"),
  firstShot: $("first-shot"),
  start: $("start"),
  video: $("video"),
  nowPlaying: $("now-playing"),
  pause: $("pause"),
  resume: $("resume"),
  stop: $("stop"),
  shotForm: $("shot-form"),
  shotPrompt: $("shot-prompt"),
  sendShot: $("send-shot"),
  timeline: $("timeline"),
  stats: $("stats"),
  queue: $("queue"),
  watching: $("watching"),
  share: $("share"),
  shareLink: $("share-link"),
  watchUrl: $("watch-url"),
  copyLink: $("copy-link"),
  shareNote: $("share-note"),
  download: $("download"),
  viewers: $("viewers"),
  timings: document.querySelector(".timings"),
};

const params = new URLSearchParams(location.search);
const PLAYER_OPTIONS = {
  backBufferS: Number(params.get("back_buffer_s") ?? 30),
  trimToS: Number(params.get("trim_to_s") ?? 10),
};
// Non-fatal error codes that answer a prompt message (it was not accepted).
const PROMPT_ERRORS = new Set(["prompt_too_long", "prompt_too_many_tokens", "rate_limited", "bad_message", "invalid_state"]);
const PING_EVERY_MS = 5000;
const PLAYHEAD_EVERY_MS = 250; // instant cuts: how often the player's position is reported
// Frames a browser has decoded ahead of currentTime are past removing without a stall, so
// the position reported is this far ahead of it (measured in Chromium: a cut 0.25 s ahead
// made the player wait; ?decode_ahead_s= overrides).
const DECODE_AHEAD_S = Number(params.get("decode_ahead_s") ?? 0.3);
// Instant cuts (a cut replaces the buffered video past the playhead) unless ?instant_cuts=0.
const FEATURES = params.get("instant_cuts") === "0" ? [] : ["withdraw"];
// Viewer mode: the session id in the query, the watch link's token in the fragment (never
// sent to a server, so no log sees it).
const WATCH_ID = params.get("watch");
const WATCH_TOKEN = new URLSearchParams(location.hash.slice(1)).get("token");
const MAX_LOG = 500; // messages kept per kind for the debug hook

let session = null;

/** One streaming session: its REST reply, socket, player, timeline and stats. As a
 * viewer (`role` "viewer"), a watch link's read-only stream of someone else's session. */
class Session {
  constructor(created, role = "owner") {
    this.id = created.session_id;
    this.token = created.token;
    this.role = role;
    this.viewers = 0; // viewer connections watching (the server says, when it changes)
    this.queue = created.state === "queued"
      ? { position: created.queue_position, estimated_wait_s: created.estimated_wait_s } : null;
    this.watchUrl = null;
    this.state = this.queue ? "queued" : "connecting";
    this.paused = false;
    this.pausedMs = 0; // total time paused, kept out of prompt-to-visible latencies
    this.pausedSince = null;
    this.lastSeq = -1;
    this.features = [];
    this.log = { hellos: 0, chunks: [], shots: [], acks: [], dropped: [], errors: [], duplicates: 0, withdrawals: [],
      queued: [], skipped: [] };
    this.firstFrameWallMs = null;
    this.firstFrameMediaTime = null; // a viewer's first frame is where it joined, not 0
    this.endReason = null;
    this.pingSentAt = null;
    this.disposed = false;
    this.stats = new Stats(ui.stats, ui.timings);
    this.stats.start();
    this.timeline = new Timeline(ui.timeline);
    this.player = new MsePlayer(ui.video, {
      ...PLAYER_OPTIONS,
      onFrame: (mediaTime, wallMs) => this.frameShown(mediaTime, wallMs),
      onError: (code, message) => showError(code, message),
    });
    this.socket = new StreamSocket(created.stream_url, created.token, {
      onMessage: (msg, data) => this.receive(msg, data),
      onState: (state, detail) => this.socketState(state, detail),
      // the owner is told how many watch; a viewer always is
      features: role === "owner" ? [...FEATURES, "viewers"] : FEATURES,
    });
    this.pinger = setInterval(() => this.ping(), PING_EVERY_MS);
    this.playheadTimer = setInterval(() => this.reportPlayhead(), PLAYHEAD_EVERY_MS);
    this.ticker = setInterval(() => this.render(), 250);
    this.socket.connect();
    if (this.queue) showQueue(this.queue);
  }

  get alive() {
    return this.state !== "ended" && this.state !== "failed";
  }

  receive(msg, data) {
    if (this.disposed) return;
    switch (msg.type) {
      case "hello":
        this.log.hellos += 1;
        this.features = msg.features ?? [];
        if (this.queue) {
          this.queue = null; // out of the waiting room: the session started
          hideQueue();
          this.setState(this.paused ? "paused" : "streaming");
        }
        this.setViewers(msg.viewers ?? 0);
        ui.video.style.aspectRatio = `${msg.width} / ${msg.height}`;
        if (this.log.hellos === 1) {
          this.player.open(msg.mime).catch((err) => this.end("failed", err.message, "media"));
        } else {
          this.player.changeType(msg.mime);
        }
        break;
      case "init":
        this.player.appendInit(data);
        break;
      case "chunk":
        if (msg.seq <= this.lastSeq) {
          this.log.duplicates += 1; // already appended: a resend after a reconnect
          break;
        }
        this.lastSeq = msg.seq;
        this.player.appendSegment(data);
        this.timeline.chunk(msg);
        this.stats.chunk(msg);
        record(this.log.chunks, { seq: msg.seq, shot: msg.shot, shot_id: msg.shot_id, pts: msg.pts,
          duration: msg.duration, frames: msg.frames, connection: this.log.hellos });
        if (this.log.chunks.length === 1) updateControls(); // a recording exists now
        break;
      case "shot":
        record(this.log.shots, msg);
        this.timeline.shot(msg);
        break;
      case "withdraw":
        // A cut replaced the video we hold past msg.pts: drop it before the new shot comes.
        record(this.log.withdrawals, msg);
        this.player.withdraw(msg.pts);
        this.timeline.withdraw(msg);
        this.socket.withdrawn(msg.seqs);
        if (msg.seqs.length && this.lastSeq >= Math.min(...msg.seqs)) this.lastSeq = Math.min(...msg.seqs) - 1;
        break;
      case "prompt_ack":
        record(this.log.acks, msg);
        this.timeline.ack(msg);
        break;
      case "prompt_dropped":
        record(this.log.dropped, msg);
        this.timeline.dropped(msg);
        break;
      case "error": {
        record(this.log.errors, msg);
        // already_connected: our previous socket is not gone yet; the reconnect retries.
        const ends = msg.fatal && msg.code !== "already_connected";
        showError(msg.code, msg.message, ends);
        if (ends) {
          this.end("failed", `${msg.code}: ${msg.message}`);
        } else if (!msg.fatal && PROMPT_ERRORS.has(msg.code)) {
          this.timeline.rejectOldest(`${msg.code}: ${msg.message}`);
        }
        break;
      }
      case "ended":
        this.end("ended", msg.reason);
        break;
      case "queued":
        record(this.log.queued, msg);
        this.queue = msg;
        showQueue(msg);
        this.setState("queued");
        break;
      case "viewers":
        this.setViewers(msg.count);
        break;
      case "skipped":
        // This viewer fell behind: the server jumps it to the latest chunk (the player
        // seeks over the hole it leaves).
        record(this.log.skipped, msg);
        break;
      case "pong":
        if (this.pingSentAt !== null) this.stats.rttMs = performance.now() - this.pingSentAt;
        this.pingSentAt = null;
        break;
      default:
        break; // a newer server may add message types: skip them
    }
  }

  socketState(state, detail) {
    if (!this.alive || this.disposed) return;
    if (state === "open") {
      if (detail.reconnect) this.stats.reconnects += 1;
      this.setState(this.queue ? "queued" : this.paused ? "paused" : "streaming");
    } else if (state === "reconnecting") {
      this.timeline.connectionLost();
      this.setState("reconnecting", detail.code ? `closed ${detail.code}${detail.reason ? ` (${detail.reason})` : ""}` : "");
    } else if (state === "closed") {
      const why = detail.gaveUp ? "connection lost" : `connection closed ${detail.code} ${detail.reason}`.trim();
      this.end("failed", why, "connection");
    } else {
      this.setState(state);
    }
  }

  frameShown(mediaTime, wallMs) {
    if (this.firstFrameWallMs === null) {
      this.firstFrameWallMs = wallMs;
      this.firstFrameMediaTime = mediaTime;
    }
    this.stats.frameShown(wallMs);
    const shot = this.timeline.shown(mediaTime, wallMs);
    if (shot) {
      if (shot.sentAt !== null) {
        this.stats.promptShown(shot.shownAt - shot.sentAt - (this.pausedTotal(wallMs) - shot.pausedBefore));
      }
      ui.nowPlaying.textContent = `Shot ${shot.shot ?? "?"}: ${shot.prompt || ui.caption.value}`;
    }
  }

  /** Instant cuts: tell the server where the player is, so a cut lands just past it. */
  reportPlayhead() {
    if (this.role !== "owner") return; // a viewer's player does not place the owner's cuts
    if (!this.features.includes("withdraw") || !this.player.started || this.paused || this.disposed) return;
    const pts = Math.min(ui.video.currentTime + DECODE_AHEAD_S, this.player.bufferedEnd());
    this.socket.send({ type: "playhead", pts: Math.round(pts * 1e4) / 1e4 });
  }

  sendPrompt(prompt, mode) {
    if (!this.socket.send({ type: "prompt", prompt, mode })) return false;
    const entry = this.timeline.sent(prompt, mode);
    entry.pausedBefore = this.pausedTotal(entry.sentAt);
    this.timeline.render();
    return true;
  }

  pause() {
    if (this.socket.send({ type: "pause" })) {
      this.paused = true;
      this.pausedSince = performance.now();
      this.player.pause();
      this.setState("paused");
    }
  }

  resume() {
    if (this.socket.send({ type: "resume" })) {
      this.paused = false;
      this.pausedMs += performance.now() - this.pausedSince;
      this.pausedSince = null;
      this.player.resume();
      this.setState("streaming");
    }
  }

  stop() {
    // The server answers `ended`; without a connection, end it over REST instead.
    if (!this.socket.send({ type: "stop" })) this.deleteSession(false);
  }

  /** DELETE the session; `keepalive` lets it outlive the page (pagehide). */
  deleteSession(keepalive) {
    fetch(`/v1/sessions/${encodeURIComponent(this.id)}`, {
      method: "DELETE", keepalive, headers: { Authorization: `Bearer ${this.token}` },
    }).then(() => this.end("ended", "deleted"), () => {});
  }

  setViewers(count) {
    this.viewers = count;
    ui.viewers.textContent = count ? `${count} watching` : "";
  }

  /** Mint a watch link (owner): anyone with it watches this session, read-only. */
  async share() {
    const res = await fetch(`/v1/sessions/${encodeURIComponent(this.id)}/viewers`, {
      method: "POST", headers: { Authorization: `Bearer ${this.token}` },
    }).catch((err) => ({ ok: false, status: 0, json: async () => ({ detail: err.message }) }));
    const reply = await res.json().catch(() => ({}));
    if (!res.ok) {
      showError(reply.code ?? `HTTP ${res.status}`, reply.detail ?? "could not make a watch link");
      return null;
    }
    this.watchUrl = reply.watch_url;
    ui.watchUrl.value = reply.watch_url;
    ui.shareNote.textContent = `Expires ${new Date(reply.expires_at).toLocaleString()}.`;
    ui.shareLink.hidden = false;
    ui.watchUrl.select();
    return reply;
  }

  /** Save the recording (what the owner was sent, up to now) as an MP4 file. */
  async downloadRecording() {
    const res = await fetch(`/v1/sessions/${encodeURIComponent(this.id)}/recording.mp4`, {
      headers: { Authorization: `Bearer ${this.token}` },
    }).catch((err) => ({ ok: false, status: 0, json: async () => ({ detail: err.message }) }));
    if (!res.ok) {
      const reply = await res.json().catch(() => ({}));
      showError(reply.code ?? `HTTP ${res.status}`, reply.detail ?? "no recording");
      return false;
    }
    const url = URL.createObjectURL(await res.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = `shotstream-${this.id}.mp4`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    return true;
  }

  pausedTotal(nowMs) {
    return this.pausedMs + (this.pausedSince === null ? 0 : nowMs - this.pausedSince);
  }

  ping() {
    if (this.socket.send({ type: "ping" })) this.pingSentAt = performance.now();
  }

  /** The session is over: play out what is buffered, freeze the controls. */
  end(state, reason, code) {
    if (!this.alive || this.disposed) return;
    this.endReason = reason;
    this.queue = null;
    hideQueue();
    if (reason === "wait_timeout") showError("wait_timeout", "no slot freed in time; try again later");
    clearInterval(this.pinger);
    clearInterval(this.playheadTimer);
    this.socket.finish();
    this.player.end();
    if (state === "failed" && code) showError(code, reason, true);
    this.setState(state, reason);
    this.render();
  }

  /** Free the page's side entirely (a new session replaces this one): from now on this
   * session's socket and timers touch nothing on the page. */
  dispose() {
    this.disposed = true;
    clearInterval(this.ticker);
    clearInterval(this.pinger);
    clearInterval(this.playheadTimer);
    this.socket.finish();
    this.player.destroy();
  }

  setState(state, detail = "") {
    this.state = state;
    const text = { connecting: "connecting…", streaming: this.role === "viewer" ? "watching" : "streaming",
      reconnecting: "reconnecting…", paused: "paused", ended: "ended", failed: "failed",
      queued: "waiting for a slot" }[state] ?? state;
    ui.connection.dataset.state = state;
    ui.connection.textContent = detail ? `${text}: ${detail}` : text;
    updateControls();
  }

  render() {
    const started = this.firstFrameWallMs;
    this.stats.render({
      bufferS: this.player.bufferAhead(),
      stalls: started === null ? 0 : this.player.waits.filter((w) => w.wallMs > started).length,
    });
    this.timeline.render();
  }

  /** Everything a test needs to check, as plain data. */
  snapshot() {
    const v = ui.video;
    return {
      sessionId: this.id,
      state: this.state,
      endReason: this.endReason,
      ...this.log,
      timeline: this.timeline.ordered().map((e) => ({ ...e })),
      currentShotId: this.timeline.current?.shotId ?? null,
      currentTime: v.currentTime,
      paused: v.paused,
      ranges: this.player.ranges(),
      bufferAhead: this.player.bufferAhead(),
      waits: this.player.waits,
      firstFrameWallMs: this.firstFrameWallMs,
      firstFrameMediaTime: this.firstFrameMediaTime,
      firstFrameMs: this.stats.firstFrameMs,
      promptLatenciesMs: this.stats.promptLatencies,
      reconnects: this.stats.reconnects,
      features: this.features,
      role: this.role,
      viewers: this.viewers,
      queue: this.queue,
      watchUrl: this.watchUrl,
      now: performance.now(),
    };
  }
}

function record(list, item) {
  list.push(item);
  if (list.length > MAX_LOG) list.shift();
}

// -- page --------------------------------------------------------------------------------------

function updateControls() {
  const live = session?.alive ?? false;
  const open = live && (session.state === "streaming" || session.state === "paused");
  const owner = (session?.role ?? "owner") === "owner";
  ui.share.disabled = !live || !owner;
  // a recording exists once video was sent (and is kept a while after the end)
  ui.download.disabled = !session || session.log.chunks.length === 0;
  ui.start.disabled = live;
  ui.caption.disabled = live;
  ui.firstShot.disabled = live;
  ui.shotPrompt.disabled = !live;
  ui.sendShot.disabled = !open;
  ui.pause.disabled = !open || session.paused;
  ui.resume.disabled = !open || !session.paused;
  ui.stop.disabled = !live;
}

function showError(code, message, fatal = false) {
  ui.errorCode.textContent = fatal ? `${code} (session ended):` : `${code}:`;
  ui.errorMessage.textContent = message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
}

function showQueue(q) {
  const wait = q.estimated_wait_s == null ? "" : `, about ${formatWait(q.estimated_wait_s)} to wait`;
  ui.queue.textContent = `The server is full: you are number ${q.position} in line${wait}. `
    + "Your session starts when a slot frees.";
  ui.queue.hidden = false;
}

function hideQueue() {
  ui.queue.hidden = true;
}

function formatWait(s) {
  return s < 90 ? `${Math.max(1, Math.round(s))} s` : `${Math.round(s / 60)} min`;
}

function wsUrl(path) {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${path}`;
}

async function loadModelInfo() {
  let res;
  try {
    res = await fetch("/v1/models");
  } catch (err) {
    ui.modelInfo.textContent = `server unreachable: ${err.message}`;
    return;
  }
  if (res.status === 503) {
    ui.modelInfo.textContent = "model is loading…";
    setTimeout(loadModelInfo, 2000);
    return;
  }
  const m = await res.json();
  // The server's own limit, so an over-long prompt cannot be typed rather than rejected.
  ui.caption.maxLength = ui.firstShot.maxLength = ui.shotPrompt.maxLength = m.max_prompt_chars;
  const weights = m.real_weights ? `weights: ${m.weights}` : "random weights";
  ui.modelInfo.textContent = `${m.preset} · ${m.width}×${m.height} @ ${m.fps} fps · ${m.device} · ${weights}`;
  if (m.notice) {
    ui.notice.textContent = `Notice: ${m.notice}`;
    ui.notice.hidden = false;
  }
  if (m.vocabulary) showVocabulary(m.vocabulary);
}

// The vocabulary a demo-style model was trained on, so a user knows which prompts steer it.
function showVocabulary(v) {
  const panel = $("vocabulary");
  const part = (name) => panel.querySelector(`[data-vocab="${name}"]`);
  const item = (text) => {
    const li = document.createElement("li");
    li.textContent = text;
    return li;
  };
  part("global").textContent = v.global_caption;
  part("shots").replaceChildren(...v.shot_captions.map(item));
  part("colours").replaceChildren(
    ...Object.entries(v.colours).map(([name, [r, g, b]]) => {
      const li = item(name);
      li.style.setProperty("--swatch", `rgb(${r}, ${g}, ${b})`);
      return li;
    }),
  );
  part("shapes").textContent = v.shapes.join(", ");
  part("matching").textContent = `Matching: ${v.matching}.`;
  panel.hidden = false;
}

async function startSession() {
  hideError();
  if (session) {
    if (session.alive) session.stop();
    session.dispose();
    session = null;
  }
  ui.timeline.replaceChildren();
  ui.nowPlaying.textContent = "—";
  // wait: when the server is full, take a place in its waiting room rather than a refusal
  const body = { prompt: ui.caption.value.trim(), wait: true };
  const firstShot = ui.firstShot.value.trim();
  if (firstShot) body.shots = [firstShot];
  ui.start.disabled = true;
  ui.connection.textContent = "creating session…";
  let res;
  try {
    res = await fetch("/v1/sessions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
  } catch (err) {
    showError("network", `could not reach the server: ${err.message}`);
    ui.connection.textContent = "no session";
    updateControls();
    return;
  }
  const reply = await res.json().catch(() => ({}));
  if (res.status !== 201 && res.status !== 202) {
    const retry = res.headers.get("Retry-After");
    showError(reply.code ?? `HTTP ${res.status}`, `${reply.detail ?? res.statusText}${retry ? ` (retry in ${retry} s)` : ""}`);
    ui.connection.textContent = "no session";
    updateControls();
    return;
  }
  session = new Session(reply);
  updateControls();
}

function sendShot() {
  const prompt = ui.shotPrompt.value.trim();
  if (!prompt || !session?.alive) return;
  const mode = ui.shotForm.elements.mode.value;
  if (session.sendPrompt(prompt, mode)) {
    ui.shotPrompt.value = "";
  } else {
    showError("not_connected", "the stream is reconnecting; the prompt was not sent, try again");
  }
}

ui.sessionForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  startSession();
});
ui.shotForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  sendShot();
});
ui.shotPrompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    sendShot();
  }
});
ui.pause.addEventListener("click", () => session?.pause());
ui.resume.addEventListener("click", () => session?.resume());
ui.stop.addEventListener("click", () => session?.stop());
ui.share.addEventListener("click", () => session?.share());
ui.download.addEventListener("click", () => session?.downloadRecording());
ui.copyLink.addEventListener("click", async () => {
  ui.watchUrl.select();
  try {
    await navigator.clipboard.writeText(ui.watchUrl.value);
    ui.shareNote.textContent = "Copied.";
  } catch {
    ui.shareNote.textContent = "Select the link and copy it (the browser did not let the page).";
  }
});
$("error-dismiss").addEventListener("click", hideError);
// Closing the tab frees the server's session now rather than after its grace period.
window.addEventListener("pagehide", () => {
  if (session?.alive && session.role === "owner") session.deleteSession(true);
});

window.shotstream = {
  snapshot: () => session?.snapshot() ?? null,
  dropConnection: () => session?.socket.drop(),
  bufferAhead: () => session?.player.bufferAhead() ?? 0,
};

updateControls();
loadModelInfo();
if (WATCH_ID && WATCH_TOKEN) {
  // Viewer mode: no session of our own; watch the one the link names.
  document.body.dataset.role = "viewer";
  ui.watching.hidden = false;
  session = new Session({
    session_id: WATCH_ID,
    token: WATCH_TOKEN,
    stream_url: wsUrl(`/v1/sessions/${encodeURIComponent(WATCH_ID)}/watch`),
  }, "viewer");
  updateControls();
}
