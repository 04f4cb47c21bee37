// The stats panel: what the viewer experiences (first frame, frame rate received, buffer,
// prompt-to-visible latency, stalls) next to what the server reports per chunk.

const FPS_WINDOW_MS = 4000;
const TIMING_KEYS = ["denoise_ms", "refresh_ms", "decode_ms", "encode_ms", "queue_ms"];
const TIMING_WINDOW = 20;

export class Stats {
  constructor(panel, timingsTable) {
    this.panel = panel;
    this.table = timingsTable;
    this.startedAt = null; // performance.now() when the viewer pressed Start
    this.firstFrameMs = null; // Start -> first frame shown
    this.received = []; // [wallMs, frames] of recent chunks
    this.chunks = 0;
    this.timings = []; // the last TIMING_WINDOW chunks' server timings
    this.promptLatencies = []; // ms, prompt sent -> its first frame shown
    this.reconnects = 0;
    this.rttMs = null;
  }

  start() { this.startedAt = performance.now(); }

  frameShown(wallMs) {
    if (this.firstFrameMs === null && this.startedAt !== null) this.firstFrameMs = wallMs - this.startedAt;
  }

  chunk(msg) {
    const now = performance.now();
    this.chunks += 1;
    this.received.push([now, msg.frames]);
    while (this.received.length && now - this.received[0][0] > FPS_WINDOW_MS) this.received.shift();
    this.timings.push(msg.timings ?? {});
    if (this.timings.length > TIMING_WINDOW) this.timings.shift();
  }

  promptShown(latencyMs) { this.promptLatencies.push(latencyMs); }

  /** Frames received per second over the last few seconds. */
  fpsReceived() {
    const now = performance.now();
    const recent = this.received.filter(([t]) => now - t <= FPS_WINDOW_MS);
    if (!recent.length) return 0;
    const span = Math.min(FPS_WINDOW_MS, now - (this.startedAt ?? now)) / 1000;
    return span > 0 ? recent.reduce((n, [, f]) => n + f, 0) / span : 0;
  }

  render({ bufferS, stalls }) {
    const set = (name, text) => { this.panel.querySelector(`[data-stat="${name}"]`).textContent = text; };
    set("ttff", this.firstFrameMs === null ? "—" : seconds(this.firstFrameMs));
    set("fps", this.chunks ? `${this.fpsReceived().toFixed(1)} fps` : "—");
    set("buffer", `${bufferS.toFixed(2)} s`);
    const lat = this.promptLatencies;
    set("prompt", lat.length
      ? `${seconds(lat.at(-1))} last, ${seconds(lat.reduce((a, b) => a + b, 0) / lat.length)} mean of ${lat.length}`
      : "—");
    set("chunks", String(this.chunks));
    set("stalls", String(stalls));
    set("reconnects", String(this.reconnects));
    set("rtt", this.rttMs === null ? "—" : `${Math.round(this.rttMs)} ms`);
    const last = this.timings.at(-1);
    fillRow(this.table.querySelector('[data-timings="last"]'), last && TIMING_KEYS.map((k) => last[k] ?? 0));
    fillRow(this.table.querySelector('[data-timings="mean"]'), last && TIMING_KEYS.map(
      (k) => this.timings.reduce((a, t) => a + (t[k] ?? 0), 0) / this.timings.length));
  }
}

function fillRow(row, values) {
  row.querySelectorAll("td").forEach((td, i) => { td.textContent = values ? values[i].toFixed(1) : ""; });
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}
