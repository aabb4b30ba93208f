// The Parley agent console: shows only the server's truth.
// * presence is the server's `presence` frame (status, reason, since); the online/away buttons ask
//   the server and wait for its answer, they never flip the badge themselves;
// * the conversation list is rebuilt from `welcome.convs` on every (re)connect: a conversation the
//   server no longer lists is marked as no longer yours, whatever the page thought;
// * transcripts come from the stream (replay after `welcome`, `sub` after an assignment).
// Configured by the fragment: /console#token=…&urls=ws://gw1/v1/ws,ws://gw2/v1/ws&queues=tier2
import { ParleyClient, defaultUrl, fragmentConfig } from "./parley.js";
import { el, bindConnectionBadge, bindNotices, clockTime, tokenClaims } from "./ui.js";
import { Transcript, TypingIndicator, throttle } from "./chat.js";

const cfg = fragmentConfig();
const root = document.getElementById("parley-console");
if (!cfg.token) {
  root.append(el("p", { class: "hint" }, "No token: open this page from the demo page (/) or as /console#token=<agent JWT>."));
  throw new Error("no token");
}
const claims = tokenClaims(cfg.token);
const client = new ParleyClient(cfg.urls.length ? cfg.urls : [defaultUrl()], cfg.token, { clientName: "parley-console/0.1" });
window.parley = { client };

const ui = {
  conn: el("span", { class: "conn" }),
  presence: el("span", { class: "presence", "aria-live": "polite" }),
  online: el("button", { class: "go-online", type: "button" }, "Go online"),
  away: el("button", { class: "go-away", type: "button" }, "Set away"),
  banners: el("div", { class: "banners" }),
  offers: el("ul", { class: "offers" }),
  convs: el("ul", { class: "convs" }),
  title: el("h2", { class: "chat-title" }, "No conversation selected"),
  convState: el("span", { class: "chat-state" }),
  scroll: el("div", { class: "scroll" }),
  typing: el("div", { class: "typing" }),
  input: el("input", { class: "input", type: "text", maxlength: 4096, placeholder: "Reply…", "aria-label": "Reply", autocomplete: "off" }),
  send: el("button", { class: "send", type: "submit" }, "Send"),
  transferTo: el("input", { class: "transfer-queue", type: "text", list: "parley-queues", placeholder: "queue", "aria-label": "Transfer to queue", value: cfg.queues?.split(",")[0] ?? "" }),
  transfer: el("button", { class: "transfer", type: "button" }, "Transfer"),
  close: el("button", { class: "close-conv", type: "button" }, "Close"),
};
const queues = new Set([...(claims.skills ?? []), ...(cfg.queues ? cfg.queues.split(",") : [])]);
const composer = el("form", { class: "composer" }, ui.input, ui.send);
root.append(
  el("header", {}, el("h1", {}, "Agent console"), el("span", { class: "me" }, claims.name ? `${claims.name} (${claims.sub})` : claims.sub ?? ""),
    ui.presence, ui.online, ui.away, ui.conn),
  ui.banners,
  el("main", {},
    el("aside", {}, el("h2", {}, "Offers"), ui.offers, el("h2", {}, "Conversations"), ui.convs),
    el("section", { class: "chat" }, el("div", { class: "chat-head" }, ui.title, ui.convState), ui.scroll, ui.typing, composer,
      el("div", { class: "actions" }, ui.transferTo, ui.transfer, ui.close),
      el("datalist", { id: "parley-queues" }, [...queues].map((q) => el("option", { value: q }))))));
bindConnectionBadge(client, ui.conn);
bindNotices(client, ui.banners);
const typing = new TypingIndicator(ui.typing);

let me = claims.sub ?? null;
let selected = null;
const convs = new Map();   // conv -> {transcript, item, customer, queue, state, unread, readSent, endedReason}
const offers = new Map();  // conv -> {item, deadline}

// --- presence: only the server's value -------------------------------------------------------------
client.on("presence", (p) => {
  ui.presence.dataset.status = p.status;
  ui.presence.textContent = `${p.status}` + (p.reason ? ` · ${p.reason.replaceAll("_", " ")}` : "") + ` · since ${clockTime(p.since)}`;
  ui.online.setAttribute("aria-pressed", String(p.status === "online"));
  ui.away.setAttribute("aria-pressed", String(p.status === "away"));
  ui.online.disabled = ui.away.disabled = false;
});
const choose = (status) => { if (client.setStatus(status)) ui.online.disabled = ui.away.disabled = true; };
ui.online.addEventListener("click", () => choose("online"));
ui.away.addEventListener("click", () => choose("away"));
client.on("state", ({ state }) => {
  if (state !== "connected") {  // while disconnected we do not know: say so instead of a stale status
    ui.presence.dataset.status = "unknown";
    ui.presence.textContent = "status unknown (reconnecting)";
  }
});

// --- conversations ---------------------------------------------------------------------------------
function entry(conv) {
  let c = convs.get(conv);
  if (c) return c;
  const item = el("li", { class: "conv", dataset: { conv } });
  c = { conv, transcript: new Transcript(conv, me), item, customer: null, queue: null, state: "assigned", unread: 0, readSent: 0 };
  item.addEventListener("click", () => select(conv));
  convs.set(conv, c);
  ui.convs.append(item);
  drawItem(c);
  if (!selected) select(conv);
  return c;
}

function drawItem(c) {
  c.item.dataset.state = c.state;
  c.item.replaceChildren(...[
    el("span", { class: "who" }, c.customer ?? c.conv.slice(0, 10)),
    el("span", { class: "queue-name" }, c.queue ? ` · ${c.queue}` : ""),
    c.unread ? el("span", { class: "unread" }, String(c.unread)) : null,
    c.state === "ended" ? el("span", { class: "ended" }, ` · ${c.endedReason ?? "ended"}`) : null].filter(Boolean));
  c.item.classList.toggle("selected", c.conv === selected);
}

function select(conv) {
  selected = conv;
  const c = convs.get(conv);
  for (const other of convs.values()) other.item.classList.toggle("selected", other.conv === conv);
  ui.scroll.replaceChildren(c ? c.transcript.list : "");
  typing.hide();
  if (c) { c.unread = 0; drawItem(c); }
  drawChat();
  markRead();
}

function drawChat() {
  const c = selected && convs.get(selected);
  ui.title.textContent = c ? `${c.customer ?? "Customer"} · ${c.queue ?? ""}` : "No conversation selected";
  ui.convState.textContent = c ? (c.state === "ended" ? `ended: ${c.endedReason}` : c.state) : "";
  ui.convState.dataset.state = c?.state ?? "";
  const active = c && c.state === "assigned";
  ui.input.disabled = ui.send.disabled = ui.transfer.disabled = ui.close.disabled = !active;
}

function end(c, reason) {
  c.state = "ended";
  c.endedReason = reason;
  drawItem(c);
  if (c.conv === selected) drawChat();
}

function markRead() {
  const c = selected && convs.get(selected);
  if (!c || c.state !== "assigned" || document.visibilityState !== "visible") return;
  if (c.transcript.lastOtherSeq > c.readSent && client.read(c.conv, c.transcript.lastOtherSeq)) c.readSent = c.transcript.lastOtherSeq;
}

client.on("welcome", (w) => {
  me = w.user;
  const listed = new Set(w.convs.map((x) => x.conv));
  for (const x of w.convs) {
    const c = entry(x.conv);
    c.queue = x.queue;
    c.state = x.state === "assigned" && x.agent === me ? "assigned" : x.state;
    drawItem(c);
  }
  for (const c of convs.values()) {   // the server's list wins over what this page believed
    if (!listed.has(c.conv) && c.state !== "ended") end(c, "no longer assigned to you");
  }
  for (const [conv, o] of offers) { o.item.remove(); offers.delete(conv); }  // outstanding ones are sent again
  drawChat();
});
client.on("state", ({ state }) => { if (state === "connected") markRead(); });

client.on("ev", (ev) => {
  const c = entry(ev.conv);
  c.transcript.apply(ev);
  const d = ev.data ?? {};
  if (ev.type === "opened") { c.customer = d.customer?.id ?? c.customer; c.queue = c.queue ?? d.queue; }
  else if (ev.type === "assigned" && d.agent?.id === me) { c.state = "assigned"; c.endedReason = null; dropOffer(ev.conv); }
  else if (ev.type === "unassigned" && d.agent?.id === me) end(c, `unassigned (${d.reason})`);
  else if (ev.type === "transferred") { c.queue = d.to_queue; end(c, `transferred to ${d.to_queue}`); }
  else if (ev.type === "closed") end(c, `closed (${(d.reason ?? "").replace("_", " ")})`);
  else if (ev.type === "message" && d.from?.id !== me) {
    if (ev.conv === selected) { typing.hide(); queueMicrotask(markRead); } else c.unread += 1;
  }
  drawItem(c);
  if (ev.conv === selected) drawChat();
});

client.on("typing", (f) => {
  if (f.conv === selected && f.from?.id !== me) typing.show(`${f.from.id} is typing…`);
});

// --- offers ----------------------------------------------------------------------------------------
function dropOffer(conv) {
  const o = offers.get(conv);
  if (o) { o.item.remove(); offers.delete(conv); }
}

client.on("offer", (f) => {
  dropOffer(f.conv);
  const countdown = el("span", { class: "countdown" });
  const accept = el("button", { class: "accept", type: "button" }, "Accept");
  const decline = el("button", { class: "decline", type: "button" }, "Decline");
  const item = el("li", { class: "offer", dataset: { conv: f.conv } }, el("span", {}, `Chat in ${f.queue} `), countdown, accept, decline);
  const o = { item, deadline: Date.now() + f.expires_ms, countdown };
  accept.addEventListener("click", () => { if (client.accept(f.conv)) { accept.disabled = decline.disabled = true; countdown.textContent = "accepting…"; } });
  decline.addEventListener("click", () => { if (client.decline(f.conv)) dropOffer(f.conv); });
  offers.set(f.conv, o);
  ui.offers.append(item);
  tick();
});
client.on("error", (f) => {
  if (f.code === "not_found" && f.ref && offers.has(f.ref)) dropOffer(f.ref);  // offer expired or taken
});

function tick() {
  const now = Date.now();
  for (const [conv, o] of offers) {
    const left = Math.ceil((o.deadline - now) / 1000);
    if (left <= 0) { dropOffer(conv); continue; }
    if (!o.item.querySelector(".accept").disabled) o.countdown.textContent = `${left} s`;
  }
}
setInterval(tick, 250);

// --- composing -------------------------------------------------------------------------------------
const sendTyping = throttle(() => selected && client.typing(selected), 2000);
ui.input.addEventListener("input", () => { if (ui.input.value) sendTyping(); });
composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const body = ui.input.value.trim();
  const c = selected && convs.get(selected);
  if (!body || !c || c.state !== "assigned") return;
  ui.input.value = "";
  const { id, promise } = client.sendNowait(c.conv, body);
  c.transcript.pending(id, body);
  promise.then((ack) => c.transcript.acked(id, ack.seq), (err) => c.transcript.nacked(id, err.code ?? "error"));
});
ui.transfer.addEventListener("click", () => {
  const q = ui.transferTo.value.trim();
  if (selected && q) client.transfer(selected, q);
});
ui.close.addEventListener("click", () => { if (selected) client.closeConversation(selected); });
document.addEventListener("visibilitychange", markRead);

drawChat();
client.connect().catch((err) => ui.banners.append(el("div", { class: "banner", dataset: { level: "critical" } }, `Cannot connect: ${err.message}`)));
