// One conversation's transcript: messages keyed by their client id (so a retried send, its ack and
// its own `ev` are one line), delivery state per own message (sending → sent on `ack` → read on the
// other side's `read` event), system events as their own lines. Text only, never HTML.
import { el, clockTime, describeEvent } from "./ui.js";

const STATE_TEXT = { sending: "Sending…", sent: "Sent", read: "Read", failed: "Not sent" };

export class Transcript {
  constructor(conv, me) {
    this.conv = conv;
    this.me = me;
    this.list = el("ol", { class: "transcript", dataset: { conv }, "aria-live": "polite" });
    this.byId = new Map();        // message id -> li
    this.readUpto = 0;            // highest `read.upto` by someone else
    this.lastOtherSeq = 0;        // newest message seq from someone else
    this.lastSeq = 0;
    this.closed = false;
  }

  _line(id, mine) {
    let li = this.byId.get(id);
    if (!li) {
      li = el("li", { class: `msg ${mine ? "mine" : "theirs"}`, dataset: { id } },
        el("span", { class: "who" }), el("span", { class: "body" }), el("span", { class: "meta" },
          el("time"), mine ? el("span", { class: "delivery" }) : null));
      this.byId.set(id, li);
      this.list.append(li);
      this._scroll();
    }
    return li;
  }

  _setState(li, state) {
    const order = ["failed", "sending", "sent", "read"];
    const cur = li.dataset.state;
    if (cur && order.indexOf(state) < order.indexOf(cur) && cur !== "failed") return;  // never backwards
    li.dataset.state = state;
    const d = li.querySelector(".delivery");
    if (d) d.textContent = STATE_TEXT[state];
  }

  /** A message this page is sending (before any ack). */
  pending(id, body) {
    const li = this._line(id, true);
    li.querySelector(".who").textContent = "You";
    li.querySelector(".body").textContent = body;
    li.querySelector("time").textContent = clockTime(Date.now());
    if (!li.dataset.seq) this._setState(li, "sending");
  }

  /** Keep lines in `seq` order (lines still without a seq, i.e. sending, stay last). */
  _place(li) {
    const seq = Number(li.dataset.seq);
    let before = null;
    for (let n = this.list.lastElementChild; n; n = n.previousElementSibling) {
      if (n === li) continue;
      if (n.dataset.seq && Number(n.dataset.seq) < seq) break;
      before = n;
    }
    if (before !== li.nextElementSibling || li.parentElement !== this.list) this.list.insertBefore(li, before);
  }

  acked(id, seq) {
    const li = this.byId.get(id);
    if (!li) return;
    li.dataset.seq = seq;
    this._place(li);
    this._setState(li, seq <= this.readUpto ? "read" : "sent");
  }

  nacked(id, code) {
    const li = this.byId.get(id);
    if (!li) return;
    li.dataset.state = "failed";
    li.querySelector(".delivery").textContent = `Not sent (${code})`;
  }

  /** An `ev` frame of this conversation (already de-duplicated and chain-checked by the client). */
  apply(ev) {
    this.lastSeq = Math.max(this.lastSeq, ev.seq);
    const d = ev.data ?? {};
    if (ev.type === "message") {
      const mine = d.from?.id === this.me;
      const li = this._line(d.id, mine);
      li.dataset.seq = ev.seq;
      this._place(li);
      li.dataset.role = d.from?.role ?? "";
      li.querySelector(".who").textContent = mine ? "You" : (d.from?.role === "agent" ? `Agent ${d.from.id}` : d.from?.id ?? "");
      li.querySelector(".body").textContent = d.body;
      li.querySelector("time").textContent = clockTime(ev.ts);
      if (mine) this._setState(li, ev.seq <= this.readUpto ? "read" : "sent");
      else this.lastOtherSeq = Math.max(this.lastOtherSeq, ev.seq);
      return;
    }
    if (ev.type === "read") {
      if (d.by?.id !== this.me && d.upto > this.readUpto) {
        this.readUpto = d.upto;
        for (const li of this.byId.values()) {
          if (li.classList.contains("mine") && li.dataset.seq && Number(li.dataset.seq) <= d.upto) this._setState(li, "read");
        }
      }
      return;
    }
    if (ev.type === "closed") this.closed = true;
    const li = el("li", { class: `system ${ev.type}`, dataset: { seq: ev.seq, type: ev.type, level: d.level ?? "" } },
      el("span", { class: "body" }, describeEvent(ev, this.me)), el("time", {}, clockTime(ev.ts)));
    this.list.append(li);
    this._place(li);
    this._scroll();
  }

  _scroll() {
    const box = this.list.parentElement;
    if (box) box.scrollTop = box.scrollHeight;
  }
}

/** Shows "… is typing" for a few seconds after each `typing` frame of someone else. */
export class TypingIndicator {
  constructor(node) { this.node = node; this.timer = null; node.hidden = true; }
  show(text) {
    this.node.textContent = text;
    this.node.hidden = false;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.hide(), 4000);
  }
  hide() { this.node.hidden = true; clearTimeout(this.timer); }
}

/** Calls `fn` at most once per `ms` (typing notifications). */
export function throttle(fn, ms) {
  let last = 0;
  return (...args) => {
    const now = Date.now();
    if (now - last >= ms) { last = now; fn(...args); }
  };
}
