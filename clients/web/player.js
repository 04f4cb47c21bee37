// A Media Source Extensions player for the server's H.264 fMP4 stream: one SourceBuffer fed
// the init segment and then each media segment in order, a bounded back buffer, muted
// autoplay from the first segment, and a jump over holes a reconnect may leave.

const EPSILON = 0.01; // seconds: well under one frame (1/16 s)

export class MsePlayer {
  /**
   * @param {HTMLVideoElement} video
   * @param {{backBufferS?: number, trimToS?: number, onFrame?: Function, onError?: Function}} options
   *   backBufferS: once this much played video is buffered behind currentTime, remove all
   *   but the last trimToS seconds of it (long streams would otherwise hit the MSE quota).
   */
  constructor(video, { backBufferS = 30, trimToS = 10, onFrame = () => {}, onError = () => {} } = {}) {
    this.video = video;
    this.backBufferS = backBufferS;
    this.trimToS = Math.min(trimToS, backBufferS);
    this.onFrame = onFrame; // (mediaTime, wallMs) for every frame shown
    this.onError = onError; // (code, message)
    this.mediaSource = null;
    this.sourceBuffer = null;
    this.mime = null;
    this.ops = []; // appends and removes waiting for the SourceBuffer, in order
    this.trimPending = false;
    this.started = false; // play() has been asked for
    this.ending = false; // endOfStream once the queue drains
    this.waits = []; // every `waiting` event: {wallMs, currentTime, ahead}
    this.tick = setInterval(() => this.jumpHole(), 250);
    this.onWaiting = () => {
      this.waits.push({ wallMs: performance.now(), currentTime: video.currentTime, ahead: this.bufferAhead() });
      this.jumpHole();
    };
    video.addEventListener("waiting", this.onWaiting);
    this.watchFrames();
  }

  /** Open a MediaSource for `mime`; resolves once its SourceBuffer exists. */
  open(mime) {
    if (!window.MediaSource || !MediaSource.isTypeSupported(mime)) {
      return Promise.reject(new Error(`this browser cannot play ${mime} through Media Source Extensions`));
    }
    this.mime = mime;
    this.mediaSource = new MediaSource();
    const ms = this.mediaSource;
    this.video.src = URL.createObjectURL(ms);
    return new Promise((resolve) => {
      ms.addEventListener("sourceopen", () => {
        URL.revokeObjectURL(this.video.src);
        this.sourceBuffer = ms.addSourceBuffer(mime);
        this.sourceBuffer.addEventListener("updateend", () => this.afterUpdate());
        this.sourceBuffer.addEventListener("error", () => this.onError("media", "the SourceBuffer rejected a segment"));
        this.pump();
        resolve();
      }, { once: true });
    });
  }

  /** A new connection may announce a different codec; the SourceBuffer can switch. */
  changeType(mime) {
    if (mime === this.mime) return;
    this.mime = mime;
    this.ops.push({ kind: "changeType", mime });
    this.pump();
  }

  appendInit(data) {
    this.ops.push({ kind: "append", data, media: false });
    this.pump();
  }

  appendSegment(data) {
    this.ops.push({ kind: "append", data, media: true });
    this.pump();
  }

  /** A cut replaced the video from `pts` on: remove it from the buffer before the next
   * segment (the new shot, which starts at `pts`) is appended. Frames before `pts` stay,
   * so playback runs on into the new shot without a gap. */
  withdraw(pts) {
    this.ops.push({ kind: "remove", start: pts, end: Number.POSITIVE_INFINITY, cut: true });
    this.pump();
  }

  /** Play out what is buffered, then end. */
  end() {
    this.ending = true;
    this.pump();
  }

  pause() { this.video.pause(); }

  resume() { if (this.started) this.play(); }

  destroy() {
    clearInterval(this.tick);
    this.video.removeEventListener("waiting", this.onWaiting);
    if (this.frameLoop?.isTimeupdate) this.video.removeEventListener("timeupdate", this.frameLoop);
    this.frameLoop = null;
    this.ops = [];
    this.video.pause();
    this.video.removeAttribute("src");
    this.video.load();
  }

  /** Seconds of video buffered ahead of the playhead (0 when starved). */
  bufferAhead() {
    const t = this.video.currentTime;
    const b = this.video.buffered;
    for (let i = 0; i < b.length; i++) {
      if (b.start(i) - EPSILON <= t && t < b.end(i)) return b.end(i) - t;
    }
    return 0;
  }

  /** The end of the buffered range holding the playhead (currentTime when starved). */
  bufferedEnd() {
    return this.video.currentTime + this.bufferAhead();
  }

  /** Buffered ranges as [[start, end], ...] seconds. */
  ranges() {
    const b = this.video.buffered;
    return Array.from({ length: b.length }, (_, i) => [b.start(i), b.end(i)]);
  }

  // -- internals ---------------------------------------------------------------------------

  pump() {
    const sb = this.sourceBuffer;
    if (!sb || sb.updating || this.mediaSource.readyState !== "open") return;
    const op = this.ops.shift();
    if (!op) {
      if (this.ending) this.mediaSource.endOfStream();
      return;
    }
    try {
      if (op.kind === "append") {
        this.lastAppendWasMedia = op.media;
        sb.appendBuffer(op.data);
      } else if (op.kind === "remove") {
        if (!op.cut) this.trimPending = false;
        sb.remove(op.start, op.end);
      } else if (op.kind === "changeType") {
        sb.changeType(op.mime);
        this.pump(); // changeType is synchronous: no updateend follows
      }
    } catch (err) {
      if (err.name === "QuotaExceededError" && op.kind === "append") {
        // Full: free what has been played and try the same segment again.
        this.ops.unshift(op);
        if (this.trim(true)) {
          this.pump();
        } else {
          this.ops.shift();
          this.onError("media", "the browser's media buffer is full; a segment was skipped");
        }
      } else {
        this.onError("media", `${op.kind} failed: ${err.message}`);
      }
    }
  }

  afterUpdate() {
    if (this.lastAppendWasMedia && !this.started) this.start();
    this.lastAppendWasMedia = false;
    this.jumpHole();
    this.trim(false);
    this.pump();
  }

  start() {
    this.started = true;
    const ranges = this.ranges();
    if (ranges.length && this.video.currentTime < ranges[0][0]) this.video.currentTime = ranges[0][0];
    this.play();
  }

  play() {
    this.video.play().catch((err) => {
      // A newer play()/pause() interrupting this one is normal; anything else is shown.
      if (err.name !== "AbortError") this.onError("autoplay", `the video could not start: ${err.message}`);
    });
  }

  /** Queue the removal of old played video once the back buffer is over its bound;
   * `force` (the quota is full) keeps only the last second. True when a removal is queued. */
  trim(force) {
    const ranges = this.ranges();
    if (this.trimPending) return true;
    if (!ranges.length) return false;
    const t = this.video.currentTime;
    const behind = t - ranges[0][0];
    if (behind > this.backBufferS || (force && behind > 1)) {
      const keep = force ? 1 : this.trimToS;
      this.trimPending = true;
      this.ops.unshift({ kind: "remove", start: 0, end: Math.max(ranges[0][0] + EPSILON, t - keep) });
    }
    return this.trimPending;
  }

  /** A starved playhead with video buffered later (a segment lost in a reconnect): seek to it. */
  jumpHole() {
    if (!this.started || this.bufferAhead() > 0.1) return;
    const t = this.video.currentTime;
    const next = this.ranges().find(([start]) => start > t + EPSILON);
    if (next) this.video.currentTime = next[0];
  }

  /** Report every frame shown (its media time), for the timeline and the latency stats. */
  watchFrames() {
    const v = this.video;
    if ("requestVideoFrameCallback" in v) {
      const loop = (_now, meta) => {
        if (this.frameLoop !== loop) return;
        this.onFrame(meta.mediaTime, performance.now());
        v.requestVideoFrameCallback(loop);
      };
      this.frameLoop = loop;
      v.requestVideoFrameCallback(loop);
    } else {
      // Coarser (about 4 Hz), but every browser has it.
      const onTime = () => this.onFrame(v.currentTime, performance.now());
      onTime.isTimeupdate = true;
      v.addEventListener("timeupdate", onTime);
      this.frameLoop = onTime;
    }
  }
}
