// Small DOM helpers shared by the Parley pages. Text is always set with textContent: message
// bodies, names and notices are never parsed as HTML.

/** el("li", {class: "msg", dataset: {id}}, "text", child) — strings become text nodes. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function clockTime(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

export function duration(s) {
  if (s == null) return "unknown";
  if (s < 60) return `${Math.max(1, Math.round(s))} s`;
  const m = Math.round(s / 60);
  return m < 60 ? `${m} min` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

const CONNECTION_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
  failed: "Sign-in refused",
};

/** Keep a badge element in step with the client's connection state (data-state = the state). */
export function bindConnectionBadge(client, badge) {
  const show = ({ state, attempt }) => {
    badge.dataset.state = state;
    badge.textContent = CONNECTION_TEXT[state] ?? state;
    if (state === "reconnecting" && attempt > 1) badge.textContent += ` (attempt ${attempt})`;
  };
  show({ state: client.state });
  client.on("state", show);
}

/** Tenant notices and system status as banners (incident banner, degraded service, all-clear). */
export function bindNotices(client, container) {
  const banners = new Map();
  const put = (id, level, text) => {
    let b = banners.get(id);
    if (!b) {
      b = el("div", { class: "banner", role: "status", dataset: { notice: id } });
      banners.set(id, b);
      container.append(b);
    }
    b.dataset.level = level;
    b.textContent = text;
  };
  const drop = (id, delayMs = 0) => {
    const b = banners.get(id);
    if (!b) return;
    const remove = () => { if (banners.get(id) === b) { b.remove(); banners.delete(id); } };
    delayMs ? setTimeout(remove, delayMs) : remove();
  };
  client.on("notice", (f) => {
    if (f.cleared) {
      put(f.id, "info", f.text);   // "Resolved: …", shown briefly
      drop(f.id, 6000);
    } else {
      put(f.id, f.level, f.text);
    }
  });
  client.on("welcome", (w) => {
    if (w.status && w.status !== "operational") {
      put("system-status", w.status === "outage" ? "critical" : "warning",
        w.status === "outage" ? "Service outage: messages may be delayed." : "Service is degraded: replies may be slower than usual.");
    } else {
      drop("system-status");
    }
  });
}

export function describeEvent(ev, me) {
  const d = ev.data ?? {};
  switch (ev.type) {
    case "opened": return `Conversation opened in queue ${d.queue}`;
    case "assigned": return d.agent?.id === me ? "You joined the conversation" : `${d.agent?.id} joined the conversation`;
    case "unassigned": return d.reason === "agent_offline"
      ? "The agent was disconnected; the conversation is waiting for the next agent"
      : `${d.agent?.id} left (${d.reason})`;
    case "transferred": return `Transferred from ${d.from_queue} to ${d.to_queue}`;
    case "escalated": return `Moved to queue ${d.to_queue} (${d.reason})`;
    case "notice": return d.text ?? "";
    case "closed": return `Conversation closed (${(d.reason ?? "").replace("_", " ")})`;
    default: return `${ev.type}`;
  }
}

/** The claims of a JWT, for display only (the server verifies tokens; this does not). */
export function tokenClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(decodeURIComponent(escape(atob(part))));
  } catch {
    return {};
  }
}
