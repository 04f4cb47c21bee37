// The stream WebSocket of one session (protocol v1): pairs each `init`/`chunk` announcement
// with the binary frame after it, and reconnects with the same token after an unexpected close.

// Close codes after which reconnecting cannot help: bad token, unknown or ended session,
// a newer connection of the session took over, repeated bad input, a message flood,
// session failed, server draining (protocol.py CloseCode).
const FINAL_CLOSE_CODES = new Set([4001, 4004, 4010, 4400, 4429, 4500, 4503]);
const RETRY_DELAYS_MS = [250, 500, 1000, 2000, 4000];

export class StreamSocket {
  /**
   * @param {string} url  the session's stream_url
   * @param {string} token  the session's bearer token
   * @param {{onMessage: Function, onState: Function, giveUpAfterMs?: number, features?: string[]}} handlers
   *   onMessage(msg, data): every server message, with its binary payload for init/chunk.
   *   onState(state, detail): "connecting" | "open" | "reconnecting" | "closed".
   *   giveUpAfterMs: stop retrying after this long without a connection (the server's
   *   grace period ends the session anyway).
   *   features: optional protocol features to ask for on every connection ("withdraw").
   */
  constructor(url, token, { onMessage, onState, giveUpAfterMs = 30000, features = [] }) {
    this.url = `${url}?token=${encodeURIComponent(token)}` + (features.length ? `&features=${features.join(",")}` : "");
    this.lastSeq = null; // the last chunk received whole: a resume asks for what follows it
    this.onMessage = onMessage;
    this.onState = onState;
    this.giveUpAfterMs = giveUpAfterMs;
    this.ws = null;
    this.announced = null; // the init/chunk message whose binary frame comes next
    this.finished = false; // no reconnect after this (ended, fatal error, stop)
    this.attempt = 0;
    this.lostAt = null; // performance.now() of the last unexpected close
    this.connections = 0;
    this.retryTimer = null;
  }

  connect() {
    this.onState(this.connections ? "reconnecting" : "connecting", {});
    // On a resume, name the last chunk we have: the server sends again what it kept after it.
    const url = this.lastSeq === null ? this.url : `${this.url}&last_seq=${this.lastSeq}`;
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      this.connections += 1;
      this.attempt = 0;
      this.lostAt = null;
      this.onState("open", { reconnect: this.connections > 1 });
    };
    ws.onmessage = (ev) => this.receive(ev.data);
    ws.onclose = (ev) => this.closed(ws, ev);
    this.ws = ws;
  }

  /** A cut withdrew chunks we hold: a resume must not claim them. */
  withdrawn(seqs) {
    if (seqs.length && this.lastSeq !== null && this.lastSeq >= Math.min(...seqs)) this.lastSeq = Math.min(...seqs) - 1;
  }

  /** Send a client message if the socket is open; false when it is not. */
  send(msg) {
    if (this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  /** The session is over (ended, fatal error): close for good, no reconnect. */
  finish() {
    this.finished = true;
    clearTimeout(this.retryTimer);
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "client done");
  }

  /** Close the socket as a network failure would (tests: the client must reconnect). */
  drop() {
    this.ws?.close(4000, "dropped by the client");
  }

  receive(data) {
    if (typeof data === "string") {
      let msg;
      try {
        msg = JSON.parse(data);
      } catch {
        this.onMessage({ type: "error", code: "bad_json", message: "the server sent malformed JSON", fatal: false });
        return;
      }
      if (msg.type === "init" || msg.type === "chunk") this.announced = msg;
      else this.onMessage(msg, null);
      return;
    }
    const msg = this.announced;
    this.announced = null;
    if (!msg) {
      this.onMessage({ type: "error", code: "bad_message", message: "a binary frame no message announced", fatal: false });
    } else if (data.byteLength !== msg.bytes) {
      this.onMessage({ type: "error", code: "bad_message", fatal: false,
        message: `${msg.type} announced ${msg.bytes} bytes, got ${data.byteLength}` });
    } else {
      if (msg.type === "chunk") this.lastSeq = Math.max(this.lastSeq ?? -1, msg.seq);
      this.onMessage(msg, data);
    }
  }

  closed(ws, ev) {
    if (ws !== this.ws) return;
    this.announced = null; // a half-delivered chunk is resent or skipped by the server
    const final = this.finished || FINAL_CLOSE_CODES.has(ev.code);
    if (final) {
      this.finished = true;
      this.onState("closed", { code: ev.code, reason: ev.reason });
      return;
    }
    const now = performance.now();
    this.lostAt ??= now;
    if (now - this.lostAt > this.giveUpAfterMs) {
      this.finished = true;
      this.onState("closed", { code: ev.code, reason: ev.reason || "connection lost", gaveUp: true });
      return;
    }
    const delay = RETRY_DELAYS_MS[Math.min(this.attempt, RETRY_DELAYS_MS.length - 1)];
    this.attempt += 1;
    this.onState("reconnecting", { code: ev.code, reason: ev.reason, delayMs: delay });
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }
}
