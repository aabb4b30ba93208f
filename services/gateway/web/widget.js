// The Parley customer widget.
//
// Embedded in any page with one tag (a floating launcher and a chat panel in a shadow root):
//   <script type="module" src="https://chat.example.com/web/widget.js"
//           data-token-url="/my-backend/parley-token" data-queue="support"></script>
// `data-token` (a JWT) instead of `data-token-url` (GET → {"token": "…"}, called again whenever a
// fresh token is needed) also works; `data-urls` lists gateway WebSocket URLs (comma separated;
// default: the gateway that served this script). As a full page: /widget#token=…&queue=…&urls=…
// Programmatic: import { mountWidget } from ".../widget.js"; mountWidget(element, config).
import { ParleyClient, defaultUrl, fragmentConfig } from "./parley.js";
import { el, bindConnectionBadge, bindNotices, duration } from "./ui.js";
import { Transcript, TypingIndicator, throttle } from "./chat.js";

const HERE = import.meta.url;

function tokenSource(cfg) {
  if (cfg.token) return cfg.token;
  if (cfg.tokenUrl) {
    return async () => {
      const r = await fetch(new URL(cfg.tokenUrl, document.baseURI), { credentials: "include" });
      if (!r.ok) throw new Error(`token endpoint answered ${r.status}`);
      return (await r.json()).token;
    };
  }
  throw new Error("Parley widget: a token or token URL is required");
}

export function mountWidget(root, cfg = {}) {
  const queue = cfg.queue || "support";
  const urls = cfg.urls?.length ? cfg.urls : [defaultUrl(HERE)];
  const client = new ParleyClient(urls, tokenSource(cfg), { clientName: "parley-widget/0.1" });
  const ui = {
    conn: el("span", { class: "conn", "aria-live": "polite" }),
    banners: el("div", { class: "banners" }),
    state: el("div", { class: "conv-state" }),
    queue: el("div", { class: "queue", hidden: true }),
    scroll: el("div", { class: "scroll" }),
    typing: el("div", { class: "typing" }),
    start: el("button", { class: "start-chat", type: "button" }, "Start a chat"),
    input: el("input", { class: "input", type: "text", maxlength: 4096, placeholder: "Type a message…", "aria-label": "Message", autocomplete: "off" }),
    send: el("button", { class: "send", type: "submit" }, "Send"),
    end: el("button", { class: "end-chat", type: "button" }, "End chat"),
  };
  const composer = el("form", { class: "composer" }, ui.input, ui.send);
  const panel = el("section", { class: "parley-widget", "aria-label": "Customer chat" },
    el("header", {}, el("span", { class: "title" }, cfg.title || "Chat with us"), ui.conn),
    ui.banners, ui.state, ui.queue, ui.scroll, ui.typing,
    el("div", { class: "actions" }, ui.start, ui.end), composer);
  root.append(panel);
  bindConnectionBadge(client, ui.conn);
  bindNotices(client, ui.banners);
  const typing = new TypingIndicator(ui.typing);

  let me = null;
  let current = null;                 // conv id shown
  const transcripts = new Map();      // conv -> Transcript
  const readSent = new Map();         // conv -> upto sent
  const storeKey = () => `parley.widget.conv.${me}`;

  function transcriptOf(conv) {
    let t = transcripts.get(conv);
    if (!t) { t = new Transcript(conv, me); transcripts.set(conv, t); }
    return t;
  }

  function show(conv) {
    current = conv;
    if (conv) { try { localStorage.setItem(storeKey(), conv); } catch { /* private mode */ } }
    ui.scroll.replaceChildren(conv ? transcriptOf(conv).list : "");
    refresh();
  }

  function setState(text, state) {
    ui.state.textContent = text;
    panel.dataset.conv = state;
  }

  function refresh() {
    const t = current && transcripts.get(current);
    const closed = !current || t?.closed;
    ui.start.hidden = !closed;
    ui.end.hidden = closed;
    ui.input.disabled = ui.send.disabled = closed;
    if (!current) setState("Ask us anything: an agent will join you.", "none");
    else if (t?.closed) setState("This conversation has ended.", "closed");
  }

  function markRead() {
    if (!current || document.visibilityState !== "visible" || panel.getClientRects().length === 0) return;
    const t = transcripts.get(current);
    if (!t || t.lastOtherSeq <= (readSent.get(current) ?? 0)) return;
    if (client.read(current, t.lastOtherSeq)) readSent.set(current, t.lastOtherSeq);
  }

  client.on("welcome", (w) => {
    me = w.user;
    for (const t of transcripts.values()) t.me = me;
    if (current) return;
    let stored = null;
    try { stored = localStorage.getItem(storeKey()); } catch { /* private mode */ }
    const open = w.convs.find((c) => c.conv === stored) ?? w.convs[w.convs.length - 1];
    if (open) {
      show(open.conv);
      setState(open.state === "assigned" ? "An agent is with you." : "Waiting for an agent…", open.state);
    } else {
      refresh();
    }
  });
  client.on("state", ({ state }) => { if (state === "connected") markRead(); });

  client.on("ev", (ev) => {
    if (!current && ev.type === "opened") show(ev.conv);
    const t = transcriptOf(ev.conv);
    t.apply(ev);
    if (ev.conv !== current) return;
    const d = ev.data ?? {};
    if (ev.type === "assigned") {
      ui.queue.hidden = true;
      setState(`Agent ${d.agent?.id} is with you.`, "assigned");
    } else if (["opened", "unassigned", "transferred", "escalated"].includes(ev.type)) {
      setState("Waiting for an agent…", "queued");
    } else if (ev.type === "message" && d.from?.id !== me) {
      typing.hide();
      queueMicrotask(markRead);
    } else if (ev.type === "closed") {
      ui.queue.hidden = true;
      typing.hide();
    }
    refresh();
  });

  client.on("queue", (f) => {
    if (f.conv !== current) return;
    ui.queue.hidden = false;
    ui.queue.dataset.position = f.position;
    ui.queue.textContent = `You are number ${f.position} in the queue` +
      (f.eta_s != null ? ` · estimated wait ${duration(f.eta_s)}` : "");
  });

  client.on("typing", (f) => {
    if (f.conv === current && f.from?.id !== me) typing.show("The agent is typing…");
  });

  const sendTyping = throttle(() => current && client.typing(current), 2000);
  ui.input.addEventListener("input", () => { if (ui.input.value) sendTyping(); });

  composer.addEventListener("submit", (e) => {
    e.preventDefault();
    const body = ui.input.value.trim();
    if (!body || !current) return;
    ui.input.value = "";
    const conv = current;
    const t = transcriptOf(conv);
    const { id, promise } = client.sendNowait(conv, body);
    t.pending(id, body);
    promise.then((ack) => t.acked(id, ack.seq), (err) => t.nacked(id, err.code ?? "error"));
  });

  ui.start.addEventListener("click", async () => {
    ui.start.disabled = true;
    try {
      const conv = await client.open(queue, { topic: cfg.topic });
      show(conv);
      setState("Waiting for an agent…", "queued");
      ui.input.focus();
    } catch (err) {
      setState(`Could not start a chat (${err.code ?? err.message}).`, "error");
    } finally {
      ui.start.disabled = false;
    }
  });

  ui.end.addEventListener("click", () => { if (current) client.closeConversation(current); });
  document.addEventListener("visibilitychange", markRead);

  refresh();
  client.connect().catch((err) => setState(`Cannot connect: ${err.message}`, "error"));
  return { client, panel, transcripts, get current() { return current; } };
}

// --- auto-mount -------------------------------------------------------------------------------
function ownScript() {
  return [...document.querySelectorAll("script[src]")].find((s) => s.src === HERE);
}

function autoMount() {
  const script = ownScript();
  if (!script || script.dataset.parleyMounted) return;
  script.dataset.parleyMounted = "1";
  const ds = script.dataset;
  if (ds.mode === "page") {  // /widget: the whole page is the widget, configured by the fragment
    const cfg = fragmentConfig();
    const root = document.getElementById("parley-widget") ?? document.body;
    window.parley = mountWidget(root, { ...cfg, queue: cfg.queue, topic: cfg.topic, title: cfg.title });
    return;
  }
  const cfg = {
    token: ds.token, tokenUrl: ds.tokenUrl, queue: ds.queue, topic: ds.topic, title: ds.title,
    urls: (ds.urls ?? "").split(",").map((s) => s.trim()).filter(Boolean),
  };
  const host = el("div", { class: "parley-embed" });
  const shadow = host.attachShadow({ mode: "open" });
  shadow.append(el("link", { rel: "stylesheet", href: new URL("parley.css", HERE).toString() }));
  const launcher = el("button", { class: "launcher", type: "button", "aria-expanded": "false" }, ds.label || "Chat with us");
  const frame = el("div", { class: "embed-panel", hidden: true });
  shadow.append(frame, launcher);
  document.body.append(host);
  let widget = null;
  launcher.addEventListener("click", () => {
    frame.hidden = !frame.hidden;
    launcher.setAttribute("aria-expanded", String(!frame.hidden));
    if (!widget) { widget = mountWidget(frame, cfg); window.parleyWidget = widget; }
  });
  if (ds.open === "true") launcher.click();
}

if (typeof document !== "undefined") {
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", autoMount);
  else autoMount();
}
