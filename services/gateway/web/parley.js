// parley.js — the Parley browser client (protocol v1, JSON subprotocol). ES module, no build step.
//
// Mirrors the Python SDK (parley.client.ParleyClient):
// * one logical session over as many WebSocket connections as it takes: reconnects with jittered
//   exponential backoff, rotating through a list of gateway URLs, and resumes every conversation
//   from the last `seq` it got (`hello.resume`);
// * keeps every `send` (and `open`) until its `ack` (`opened`) and sends it again with the same id
//   after a reconnect or a retryable `nack` — the server de-duplicates, so it is stored once;
// * checks the `prev` chain of every event: duplicates are dropped, gaps are recorded in
//   `violations` (and reported as a "violation" event).
//
//   import { ParleyClient } from "/web/parley.js";
//   const client = new ParleyClient(["ws://gw1/v1/ws", "ws://gw2/v1/ws"], token);
//   client.on("ev", (ev) => render(ev));
//   client.on("state", ({ state }) => badge(state));
//   await client.connect();
//   const conv = await client.open("support");
//   await client.send(conv, "hello");            // resolves with the ack once durable

export const VERSION = "0.1.0";
export const CLOSE_UNAUTHORIZED = 4001;

export class ParleyError extends Error {
  constructor(frame) {
    super(`${frame.t} ${frame.code}${frame.msg ? ": " + frame.msg : ""}`);
    this.frame = frame;
    this.code = frame.code;
  }
}

/** A new random id (hex), for `send` and `open` request ids. */
export function newId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID().replaceAll("-", "");
  return Array.from({ length: 32 }, () => Math.floor(Math.random() * 16).toString(16)).join("");
}

/** The default gateway URL for a page or script served by a gateway: ws(s)://<its host>/v1/ws. */
export function defaultUrl(base = globalThis.location?.href) {
  const u = new URL("/v1/ws", base);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  return u.toString();
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class ParleyClient {
  /**
   * @param {string|string[]} urls gateway WebSocket URLs, tried in turn
   * @param {string|(() => string|Promise<string>)} token a JWT, or a function returning a fresh one
   * @param {object} [opts] backoffMin/backoffMax (ms), clientName, keepFrames, connectTimeoutMs, handshakeTimeoutMs
   */
  constructor(urls, token, opts = {}) {
    this.urls = Array.isArray(urls) ? [...urls] : [urls];
    if (!this.urls.length) throw new Error("at least one gateway URL is required");
    this._token = token;
    this.clientName = opts.clientName ?? `parley-js/${VERSION}`;
    this.backoffMin = opts.backoffMin ?? 50;
    this.backoffMax = opts.backoffMax ?? 3000;
    this.keepFrames = opts.keepFrames ?? false;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 10000;
    // a frozen gateway still accepts TCP (the kernel does) but never answers the upgrade: give it
    // this long, not the whole welcome wait, before moving to the next URL
    this.handshakeTimeoutMs = Math.min(opts.handshakeTimeoutMs ?? 3000, this.connectTimeoutMs);
    this.positions = {};            // conv -> last seq delivered to the application
    this.violations = [];           // {kind: "gap"|"duplicate", conv, seq, prev, expectedPrev}
    this.frames = [];               // every frame, when keepFrames
    this.welcome = null;
    this.presence = null;
    this.state = "idle";            // idle | connecting | connected | reconnecting | closed | failed
    this.stats = { connects: 0, reconnects: 0, resent: 0, lastCloseCode: null, closeCodes: [] };
    this._pending = new Map();      // send id -> {frame, resolve, reject, attempts}
    this._opens = new Map();        // open id -> {frame, resolve, reject}
    this._listeners = new Map();
    this._ws = null;
    this._urlIndex = 0;
    this._attempt = 0;
    this._unauthorized = 0;
    this._closing = false;
    this._nextDelay = null;
    this._suspendedUntil = 0;
    this._stalledUntil = 0;
    this._timers = new Set();
    this._connectWaiters = [];
  }

  // --- events ---------------------------------------------------------------------------------
  /** Call `cb(frame)` for every frame of type `kind` ("*": every frame). Synthetic kinds:
   *  "state" ({state, url, code, attempt, delay}), "violation" (a Violation), "fatal" (Error).
   *  Returns a function that removes the listener. */
  on(kind, cb) {
    if (!this._listeners.has(kind)) this._listeners.set(kind, new Set());
    this._listeners.get(kind).add(cb);
    return () => this._listeners.get(kind)?.delete(cb);
  }

  _emit(kind, value) {
    for (const key of [kind, "*"]) {
      if (key === "*" && ["state", "violation", "fatal"].includes(kind)) continue;
      for (const cb of [...(this._listeners.get(key) ?? [])]) {
        try { cb(value); } catch (e) { console.error("parley listener failed", e); }
      }
    }
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  // --- lifecycle ------------------------------------------------------------------------------
  /** Start the session; resolves with the first `welcome`. */
  connect() {
    const p = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (this.state === "idle" || this.state === "closed") {
      this._closing = false;
      this._attempt = 0;
      this._dial();
    } else if (this.state === "connected") {
      this._settleWaiters();
    }
    return p;
  }

  /** End the session (no reconnect). Unacked sends stay pending until `connect()` again. */
  close() {
    this._closing = true;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    const ws = this._ws;
    this._ws = null;
    if (ws) { this._detach(ws); try { ws.close(1000, "bye"); } catch { /* closed */ } }
    this._setState("closed");
  }

  /** Cut the current connection at once (as a network failure would); the session reconnects. */
  drop() {
    if (this._ws) this._abandon(this._ws, 4000);
  }

  /** Cut the connection and stay away for `ms` before reconnecting (a longer outage). */
  suspend(ms) {
    this._suspendedUntil = Date.now() + ms;
    this.drop();
  }

  /** Stop sending heartbeats for `ms` (0: resume at once) while the socket stays open: the server
   *  then sees a silent client — what a frozen tab or a black-holed network looks like to it. */
  stall(ms) {
    this._stalledUntil = ms > 0 ? Date.now() + ms : 0;
    if (!ms) this._ping();
  }

  get connected() { return this.state === "connected"; }

  get unacked() { return this._pending.size; }

  /** Pending sends, oldest first: [{id, conv, body, attempts}]. */
  pendingSends() {
    return [...this._pending.values()].map((p) => ({ id: p.frame.id, conv: p.frame.conv, body: p.frame.body, attempts: p.attempts }));
  }

  _later(fn, ms) {
    const t = setTimeout(() => { this._timers.delete(t); fn(); }, ms);
    this._timers.add(t);
    return t;
  }

  async _tokenValue() {
    return typeof this._token === "function" ? await this._token() : this._token;
  }

  async _dial() {
    if (this._closing) return;
    const wait = this._suspendedUntil - Date.now();
    if (wait > 0) { this._later(() => this._dial(), wait); return; }
    const url = this.urls[this._urlIndex % this.urls.length];
    this._urlIndex += 1;
    this._setState(this.stats.connects ? "reconnecting" : "connecting", { url, attempt: this._attempt });
    let token;
    try {
      token = await this._tokenValue();
    } catch (e) {
      this._retry(null);
      return;
    }
    if (this._closing) return;
    let ws;
    try {
      ws = new WebSocket(url, "parley.v1.json");
    } catch (e) {
      this._retry(null);
      return;
    }
    this._ws = ws;
    ws._parley = { opened: false, welcomed: false, lastIn: Date.now(), url, timers: [] };
    ws._parley.timers.push(setTimeout(() => { if (!ws._parley.opened) this._abandon(ws, null); }, this.handshakeTimeoutMs));
    ws._parley.timers.push(setTimeout(() => { if (!ws._parley.welcomed) this._abandon(ws, null); }, this.connectTimeoutMs));
    ws.onopen = () => {
      ws._parley.opened = true;
      const hello = { t: "hello", token, client: this.clientName };
      if (Object.keys(this.positions).length) hello.resume = { ...this.positions };
      this._write(hello, ws);
    };
    ws.onmessage = (msg) => {
      if (typeof msg.data !== "string") return;
      let frame;
      try { frame = JSON.parse(msg.data); } catch { return; }
      ws._parley.lastIn = Date.now();
      if (frame.t === "welcome") this._onWelcome(ws, frame);
      this._dispatch(frame);
    };
    ws.onclose = (ev) => this._onClosed(ws, ev.code);
    ws.onerror = () => { /* onclose follows */ };
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    for (const t of ws._parley?.timers ?? []) { clearTimeout(t); clearInterval(t); }
  }

  /** Give up on a socket without waiting for the browser's close handshake. */
  _abandon(ws, code) {
    this._detach(ws);
    try { ws.close(4000, "abandoned"); } catch { /* already closed */ }
    this._onClosed(ws, code);
  }

  _onClosed(ws, code) {
    if (ws !== this._ws) return;
    const welcomed = ws._parley?.welcomed;
    this._detach(ws);
    this._ws = null;
    this.stats.lastCloseCode = code ?? null;
    if (code != null) this.stats.closeCodes.push(code);
    if (this._closing) return;
    if (code === CLOSE_UNAUTHORIZED) {
      this._unauthorized += 1;
      if (typeof this._token !== "function" && this._unauthorized >= 2) {
        const err = new Error("token refused (4001)");
        this._setState("failed", { code });
        this._emit("fatal", err);
        for (const w of this._connectWaiters.splice(0)) w.reject(err);
        return;
      }
    } else if (welcomed) {
      this._unauthorized = 0;
    }
    if (welcomed) this._attempt = 0;
    this._retry(code);
  }

  _retry(code) {
    if (this._closing) return;
    this._attempt += 1;
    let delay = Math.min(this.backoffMax, this.backoffMin * 2 ** Math.min(this._attempt - 1, 10));
    delay = delay * (0.5 + Math.random());
    if (this._nextDelay != null) { delay = this._nextDelay; this._nextDelay = null; }
    this._setState("reconnecting", { code, attempt: this._attempt, delay: Math.round(delay) });
    this._later(() => this._dial(), delay);
  }

  _onWelcome(ws, frame) {
    ws._parley.welcomed = true;
    this.welcome = frame;
    this.stats.connects += 1;
    if (this.stats.connects > 1) this.stats.reconnects += 1;
    const hb = frame.heartbeat_ms || 5000;
    // twice per heartbeat interval, so one late timer never costs a heartbeat
    ws._parley.timers.push(setInterval(() => { if (ws === this._ws) this._ping(); }, Math.max(100, hb / 2)));
    ws._parley.timers.push(setInterval(() => {
      if (ws === this._ws && Date.now() - ws._parley.lastIn > 3 * hb) this._abandon(ws, null);  // silent server
    }, Math.max(100, hb / 2)));
    this._setState("connected", { url: ws._parley.url, node: frame.node });
    this._resendPending();
    this._settleWaiters();
  }

  _settleWaiters() {
    for (const w of this._connectWaiters.splice(0)) w.resolve(this.welcome);
  }

  _ping() {
    if (Date.now() < this._stalledUntil) return;
    this._write({ t: "ping" });
  }

  _write(frame, ws = this._ws) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    if (frame.t !== "hello" && ws === this._ws && !ws._parley.welcomed) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /** Send a raw frame on the current connection (no delivery tracking); false when not connected. */
  sendFrame(frame) { return this._write(frame); }

  _resendPending() {
    for (const o of this._opens.values()) this._write(o.frame);
    for (const p of this._pending.values()) {
      p.attempts += 1;
      this.stats.resent += 1;
      this._write(p.frame);
    }
  }

  // --- incoming -------------------------------------------------------------------------------
  _dispatch(frame) {
    const kind = String(frame.t);
    if (kind === "ev") {
      if (!this._checkChain(frame)) return;  // a duplicate: already delivered
    } else if (kind === "ack") {
      const p = this._pending.get(String(frame.id));
      if (p) { this._pending.delete(String(frame.id)); p.resolve(frame); }
    } else if (kind === "nack") {
      this._onNack(frame);
    } else if (kind === "opened") {
      const o = this._opens.get(String(frame.id));
      if (o) { this._opens.delete(String(frame.id)); o.resolve(frame.conv); }
    } else if (kind === "error") {
      this._onError(frame);
    } else if (kind === "presence") {
      this.presence = frame;
    } else if (kind === "reconnect") {
      this._nextDelay = Math.max(0, Number(frame.after_ms) || 0);
    }
    if (this.keepFrames) this.frames.push(frame);
    this._emit(kind, frame);
  }

  _checkChain(frame) {
    const { conv, seq, prev } = frame;
    const last = this.positions[conv] ?? 0;
    if (seq <= last) {
      this._violation({ kind: "duplicate", conv, seq, prev, expectedPrev: last });
      return false;
    }
    if (prev !== last) this._violation({ kind: "gap", conv, seq, prev, expectedPrev: last });
    this.positions[conv] = seq;
    return true;
  }

  _violation(v) {
    this.violations.push(v);
    this._emit("violation", v);
  }

  _onNack(frame) {
    const id = String(frame.id);
    const p = this._pending.get(id);
    if (!p) return;
    if (frame.retry) {
      const delay = Math.min(2000, 100 * 2 ** Math.min(p.attempts, 5)) * (0.5 + Math.random());
      this._later(() => {
        if (!this._pending.has(id)) return;
        p.attempts += 1;
        this._write(p.frame);
      }, delay);
      return;
    }
    this._pending.delete(id);
    p.reject(new ParleyError(frame));
  }

  _onError(frame) {
    const ref = frame.ref == null ? null : String(frame.ref);
    const o = ref != null ? this._opens.get(ref) : null;
    if (!o) return;
    if (["unavailable", "rate_limited", "internal"].includes(frame.code)) {
      this._later(() => { if (this._opens.has(ref)) this._write(o.frame); }, 200);
      return;
    }
    this._opens.delete(ref);
    o.reject(new ParleyError(frame));
  }

  // --- requests -------------------------------------------------------------------------------
  /** Open a conversation (retried with the same id until `opened`); resolves with its id. */
  open(queue, { topic, meta, id } = {}) {
    const frame = { t: "open", id: id ?? newId(), queue };
    if (topic != null) frame.topic = topic;
    if (meta != null) frame.meta = meta;
    return new Promise((resolve, reject) => {
      this._opens.set(frame.id, { frame, resolve, reject });
      this._write(frame);
    });
  }

  /** Send a message; resolves with its `ack` once durable, retried across reconnects. */
  send(conv, body, id) { return this.sendNowait(conv, body, id).promise; }

  /** Like `send`, but returns `{id, promise}` at once (the id is known before the ack). */
  sendNowait(conv, body, id) {
    const frame = { t: "send", id: id ?? newId(), conv, body };
    const existing = this._pending.get(frame.id);
    if (existing) return { id: frame.id, promise: existing.promise };
    let resolve, reject;
    const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
    promise.catch(() => {});  // callers that only watch frames need not handle it
    this._pending.set(frame.id, { frame, resolve, reject, attempts: 0, promise });
    this._write(frame);
    return { id: frame.id, promise };
  }

  read(conv, upto) { return this._write({ t: "read", conv, upto }); }
  typing(conv) { return this._write({ t: "typing", conv }); }
  closeConversation(conv) { return this._write({ t: "close", conv }); }
  sub(conv, after) { return this._write({ t: "sub", conv, after: after ?? this.positions[conv] ?? 0 }); }
  setStatus(status) { return this._write({ t: "status", status }); }
  accept(conv) { return this._write({ t: "accept", conv }); }
  decline(conv) { return this._write({ t: "decline", conv }); }
  transfer(conv, queue) { return this._write({ t: "transfer", conv, queue }); }
}

/** Page configuration from the URL fragment: `#token=…&urls=ws://a/v1/ws,ws://b/v1/ws&queue=…`.
 *  The fragment never reaches a server (nor its logs, nor a Referer header). */
export function fragmentConfig(hash = globalThis.location?.hash ?? "") {
  const params = new URLSearchParams(hash.replace(/^#/, ""));
  const cfg = Object.fromEntries(params.entries());
  cfg.urls = (cfg.urls ?? "").split(",").map((s) => s.trim()).filter(Boolean);
  return cfg;
}

export { sleep };
