// The shot timeline: every prompt the viewer sent and every shot the server started, with
// where each stands. A shot is "current" once the frame shown reaches its first chunk's pts.

const FRAME_EPSILON = 0.001; // seconds: pts are exact multiples of 1/fps
const MAX_PAST = 12; // past and dropped entries kept; a long stream keeps a bounded list

const LABELS = {
  sent: "sent",
  queued: "queued",
  upcoming: "up next",
  current: "on screen",
  past: "shown",
  dropped: "dropped",
  rejected: "rejected",
};

const ORIGINS = {
  you: "sent from this page",
  api: "sent through the API",
  start: "session start",
  session: "from the session's shot list",
  continue: "the shot ended: same prompt again",
};

/**
 * One timeline entry. status: sent (no ack yet) -> queued (acked) -> upcoming (its `shot`
 * message came) -> current -> past; or dropped / rejected.
 * @typedef {{key: number, shotId: ?number, shot: ?number, prompt: ?string, mode: ?string,
 *   origin: string, status: string, startsAtSeq: ?number, pts: ?number, sentAt: ?number,
 *   shownAt: ?number, shownMediaTime: ?number, reason: ?string}} Entry
 */

export class Timeline {
  constructor(list) {
    this.list = list; // the <ol>
    this.entries = []; // in the order they became known
    this.nextKey = 0;
    this.awaitingAck = []; // entries sent, answered in order by prompt_ack or an error
    this.current = null;
    this.dirty = true;
  }

  byShotId(id) {
    return this.entries.find((e) => e.shotId === id);
  }

  add(fields) {
    const e = { key: this.nextKey++, shotId: null, shot: null, prompt: null, mode: null, origin: "server",
      status: "upcoming", startsAtSeq: null, pts: null, sentAt: null, shownAt: null, shownMediaTime: null,
      reason: null, ...fields };
    this.entries.push(e);
    this.dirty = true;
    return e;
  }

  /** The viewer sent a prompt over the stream. */
  sent(prompt, mode) {
    const e = this.add({ prompt, mode, origin: "you", status: "sent", sentAt: performance.now() });
    this.awaitingAck.push(e);
    return e;
  }

  /** prompt_ack: a new ack answers the oldest unanswered prompt; a re-ack moves a known shot. */
  ack(msg) {
    let e = this.byShotId(msg.shot_id);
    if (!e) {
      // The server answers a connection's prompts in order; an ack we cannot match came
      // from the REST API (its text arrives with the `shot` message).
      e = this.awaitingAck.shift() ?? this.add({ origin: "api", status: "queued" });
      e.shotId = msg.shot_id;
    }
    e.startsAtSeq = msg.starts_at_seq;
    if (e.status === "sent") e.status = "queued";
    this.dirty = true;
    return e;
  }

  /** A non-fatal error that answers a prompt (too long, rate limited...) rejects it. */
  rejectOldest(reason) {
    const e = this.awaitingAck.shift();
    if (!e) return null;
    e.status = "rejected";
    e.reason = reason;
    this.dirty = true;
    return e;
  }

  /** The connection dropped: acks in flight are lost, so unanswered prompts stay unmatched
   * until their `shot` message (matched by text) or never. */
  connectionLost() {
    this.awaitingAck = [];
  }

  dropped(msg) {
    const e = this.byShotId(msg.shot_id) ?? this.add({ shotId: msg.shot_id, origin: "api" });
    e.status = "dropped";
    e.reason = msg.reason;
    this.dirty = true;
  }

  /** `shot`: a shot begins at starts_at_seq (the server's own continuations included). */
  shot(msg) {
    let e = this.byShotId(msg.shot_id);
    if (!e) {
      // A prompt whose ack a reconnect swallowed: match it by its text.
      e = this.entries.find((x) => x.shotId === null && x.status === "sent" && x.prompt === msg.prompt);
      if (e) {
        e.shotId = msg.shot_id;
      } else {
        const continues = this.entries.some((x) => x.shot === msg.shot - 1 && x.prompt === msg.prompt);
        e = this.add({ shotId: msg.shot_id, origin: msg.shot === 0 ? "start" : continues ? "continue" : "session" });
      }
    }
    Object.assign(e, { shot: msg.shot, prompt: msg.prompt, startsAtSeq: msg.starts_at_seq });
    if (e.status === "sent" || e.status === "queued") e.status = "upcoming";
    this.dirty = true;
  }

  /** withdraw: video from `msg.pts` on will not be shown; a shot that began there or later
   * was replaced by the cut (a user prompt's gets its own prompt_dropped). */
  withdraw(msg) {
    for (const e of this.entries) {
      if (e.pts !== null && e.pts >= msg.pts - FRAME_EPSILON && e.shotId !== msg.shot_id) {
        if (e.status !== "dropped") {
          e.status = "dropped";
          e.reason = "replaced by a later cut before it was shown";
        }
        e.pts = null;
      }
    }
    this.dirty = true;
  }

  /** A chunk arrived: the first chunk of a shot gives the pts where that shot is shown. */
  chunk(msg) {
    const e = this.byShotId(msg.shot_id);
    if (e && e.pts === null) {
      e.pts = msg.pts;
      e.firstSeq = msg.seq;
    }
  }

  /** A frame at `mediaTime` is on screen: returns the entry that just became current, if any. */
  shown(mediaTime, wallMs) {
    let now = null;
    for (const e of this.entries) {
      if (e.pts !== null && e.pts <= mediaTime + FRAME_EPSILON && (now === null || e.pts >= now.pts)) now = e;
    }
    if (!now || now === this.current) return null;
    if (this.current) this.current.status = "past";
    this.current = now;
    now.status = "current";
    now.shownAt = wallMs;
    now.shownMediaTime = mediaTime;
    this.prune();
    this.dirty = true;
    return now;
  }

  prune() {
    const old = this.entries.filter((e) => e.status === "past" || e.status === "dropped" || e.status === "rejected");
    const drop = new Set(old.slice(0, Math.max(0, old.length - MAX_PAST)));
    if (drop.size) this.entries = this.entries.filter((e) => !drop.has(e));
  }

  /** Entries in stream order: by the chunk they start at, unplaced ones last. */
  ordered() {
    const at = (e) => (e.startsAtSeq ?? Infinity);
    return [...this.entries].sort((a, b) => at(a) - at(b) || a.key - b.key);
  }

  render() {
    if (!this.dirty) return;
    this.dirty = false;
    const items = this.ordered().map((e) => {
      const li = document.createElement("li");
      li.className = "shot";
      li.dataset.status = e.status;
      if (e.shotId !== null) li.dataset.shotId = e.shotId;
      if (e.status === "current") li.setAttribute("aria-current", "true");
      const badge = document.createElement("span");
      badge.className = "shot-badge";
      badge.textContent = LABELS[e.status];
      const prompt = document.createElement("span");
      prompt.className = "shot-prompt";
      prompt.textContent = e.prompt === null ? "(prompt sent through the API)" : e.prompt || "(global caption only)";
      if (e.prompt) prompt.title = e.prompt;
      const meta = document.createElement("span");
      meta.className = "shot-meta";
      meta.textContent = describe(e);
      li.append(badge, prompt, meta);
      return li;
    });
    this.list.replaceChildren(...items);
    const current = this.list.querySelector('[aria-current="true"]');
    if (current) this.list.scrollTop = current.offsetTop - 4; // keep the list, not the page, in view
  }
}

function describe(e) {
  const parts = [];
  if (e.shot !== null) parts.push(`shot ${e.shot}`);
  if (e.startsAtSeq !== null) parts.push(`from chunk ${e.startsAtSeq}`);
  if (e.mode) parts.push(e.mode);
  parts.push(ORIGINS[e.origin]);
  if (e.reason) parts.push(e.reason);
  return parts.join(" · ");
}
