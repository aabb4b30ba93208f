// The demo page: links the widget, the console and the supervisor view with demo tokens. Tokens
// come from /demo/tokens, which exists only when the gateway runs under `parley dev`
// (PARLEY_DEMO_TOKENS=1); anywhere else the page asks for tokens instead.
import { el } from "./ui.js";

const root = document.getElementById("parley-demo");
const link = (path, token, label, extra = "") => el("a", { href: `${path}#token=${encodeURIComponent(token)}${extra}`, target: "_blank", rel: "noopener" }, label);

function links(t) {
  return el("ul", { class: "demo-links" },
    el("li", {}, link("/widget", t.customer, "Customer widget"), ` — as ${t.customer_id}, queue support`),
    el("li", {}, link("/console", t.agent, "Agent console (agent-1)"), " — serves support"),
    el("li", {}, link("/console", t.agent2, "Agent console (agent-2)", "&queues=tier2"), " — serves support and tier2"),
    el("li", {}, link("/supervisor", t.supervisor, "Supervisor view"), " — agents and queues, live"),
    el("li", {}, el("a", { href: "/demo/embed", target: "_blank" }, "The widget embedded in another page"), " — one script tag"));
}

function manual() {
  const inputs = { customer: "customer JWT", agent: "agent JWT", supervisor: "supervisor JWT" };
  const out = el("div");
  const form = el("form", { class: "manual" },
    ...Object.entries(inputs).map(([k, ph]) => el("label", {}, `${k} `, el("input", { name: k, placeholder: ph, size: 60 }))),
    el("button", { type: "submit" }, "Make links"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const f = new FormData(form);
    out.replaceChildren(el("ul", { class: "demo-links" },
      f.get("customer") ? el("li", {}, link("/widget", f.get("customer"), "Customer widget")) : null,
      f.get("agent") ? el("li", {}, link("/console", f.get("agent"), "Agent console")) : null,
      f.get("supervisor") ? el("li", {}, link("/supervisor", f.get("supervisor"), "Supervisor view")) : null));
  });
  return el("div", {},
    el("p", {}, "Demo tokens are only handed out when the gateway runs under `parley dev`. Here, paste tokens minted by your back end (POST /v1/tokens with the admin key):"),
    form, out);
}

const r = await fetch("/demo/tokens", { cache: "no-store" }).catch(() => null);
if (r && r.ok) root.append(el("p", {}, "Demo tenant 'demo'. Open the customer widget and an agent console side by side:"), links(await r.json()));
else root.append(manual());
