// The Parley supervisor view: agents (status, load) and queues (depth, oldest wait), polled from
// GET /v1/agents and /v1/queues with the supervisor's token, and the tenant's /v1/status.
// Configured by the fragment: /supervisor#token=<supervisor JWT>&every=2000
import { fragmentConfig } from "./parley.js";
import { el, clockTime, duration, tokenClaims } from "./ui.js";

const cfg = fragmentConfig();
const root = document.getElementById("parley-supervisor");
const every = Math.max(500, Number(cfg.every) || 2000);
const claims = cfg.token ? tokenClaims(cfg.token) : {};
const ui = {
  status: el("span", { class: "system-status" }),
  updated: el("span", { class: "updated" }),
  error: el("div", { class: "banner", dataset: { level: "warning" }, hidden: true }),
  notices: el("div", { class: "banners" }),
  agents: el("tbody", { class: "agents" }),
  queues: el("tbody", { class: "queues" }),
};
const table = (head, body) => el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), body);
root.append(
  el("header", {}, el("h1", {}, "Supervisor"), el("span", { class: "me" }, `${claims.sub ?? ""} · tenant ${claims.tenant ?? "?"}`), ui.status, ui.updated),
  ui.error, ui.notices,
  el("main", { class: "supervisor" },
    el("section", {}, el("h2", {}, "Agents"), table(["agent", "status", "load", "skills", "last heartbeat", "gateway"], ui.agents)),
    el("section", {}, el("h2", {}, "Queues"), table(["queue", "waiting", "oldest wait", "agents online"], ui.queues))));

async function get(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${cfg.token}` }, cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${(await r.json().catch(() => ({}))).reason ?? ""}`);
  return r.json();
}

async function poll() {
  try {
    const [a, q, s] = await Promise.all([get("/v1/agents"), get("/v1/queues"), get(`/v1/status?tenant=${encodeURIComponent(claims.tenant ?? "")}`)]);
    ui.agents.replaceChildren(...a.agents.sort((x, y) => x.id.localeCompare(y.id)).map((ag) =>
      el("tr", { dataset: { agent: ag.id, status: ag.status } },
        el("td", {}, ag.id), el("td", { class: "status" }, ag.status), el("td", { class: "load" }, `${ag.load}/${ag.max_chats}`),
        el("td", {}, (ag.skills ?? []).join(", ")), el("td", {}, ag.last_heartbeat ? clockTime(ag.last_heartbeat) : "—"),
        el("td", {}, ag.node ?? "—"))));
    ui.queues.replaceChildren(...q.queues.map((qu) =>
      el("tr", { dataset: { queue: qu.queue } },
        el("td", {}, qu.queue), el("td", { class: "depth" }, String(qu.depth)),
        el("td", { class: "oldest" }, qu.depth ? duration(qu.oldest_wait_s) : "—"), el("td", { class: "online" }, String(qu.agents_online)))));
    ui.status.dataset.status = s.status;
    ui.status.textContent = `system ${s.status}`;
    ui.notices.replaceChildren(...s.notices.map((n) => el("div", { class: "banner", dataset: { level: n.level, notice: n.id } }, n.text)));
    ui.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    ui.error.hidden = true;
  } catch (err) {
    ui.error.textContent = `Cannot refresh: ${err.message}`;
    ui.error.hidden = false;
  } finally {
    setTimeout(poll, every);
  }
}

if (!cfg.token) root.append(el("p", { class: "hint" }, "No token: open this page from the demo page (/) or as /supervisor#token=<supervisor JWT>."));
else poll();
