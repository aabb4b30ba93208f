"""The widget, the agent console and the supervisor view in a real browser (Playwright + Chromium)
against the services as real processes, two gateways.

Screenshots go to ``test-artifacts/web/``. Chromium: ``$PARLEY_CHROMIUM``, else Debian's
``chromium`` on the PATH (``.ci/run`` installs it), else Playwright's own browser; without any the
tests skip and say why — except with ``PARLEY_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest
from helpers import ADMIN, SECRET, token

from parley.testing.processes import Stack

REQUIRED = os.environ.get("PARLEY_REQUIRE_BROWSER") == "1"  # .ci/run sets it: CI fails instead of skipping
if REQUIRED:
    import playwright.sync_api as playwright_api
else:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
expect = playwright_api.expect

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
HEARTBEAT_MS = 2000   # the client pings every 1 s; the server closes a silent socket after 6 s
PRESENCE_TTL_MS = 3000  # < 3 × heartbeat: a silent but open console is told `offline` before the server hangs up
expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    executable = os.environ.get("PARLEY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    pw = playwright_api.sync_playwright().start()
    try:
        try:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as exc:  # no Debian chromium and no Playwright browser downloaded
            reason = f"no usable Chromium (tried {executable or 'Playwright default'}): {str(exc).splitlines()[0]}"
            print(reason)
            if REQUIRED:
                raise
            pytest.skip(reason)
        yield browser
        browser.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def procs(nats_server, tmp_path_factory):
    stack = Stack(
        [nats_server.url],
        env={"PARLEY_JWT_SECRET": SECRET, "PARLEY_ADMIN_KEY": ADMIN, "PARLEY_HEARTBEAT_MS": str(HEARTBEAT_MS),
             "PARLEY_PRESENCE_TTL_MS": str(PRESENCE_TTL_MS), "PARLEY_REQUEUE_GRACE_MS": "10000",
             "PARLEY_OFFER_TIMEOUT_MS": "20000", "PARLEY_DEMO_TOKENS": "1"},  # as under `parley dev`
        counts={"gateway": 2, "router": 1, "presence": 1, "transcript": 1},
        data_dir=str(tmp_path_factory.mktemp("web-stack")),
    ).start()
    yield stack
    stack.stop()


@pytest.fixture
def contexts(browser):
    made = []

    def new_page():
        ctx = browser.new_context(viewport={"width": 1000, "height": 700})
        made.append(ctx)
        ctx.on("page", lambda page: page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}")))
        return ctx.new_page()

    errors: list[str] = []
    yield new_page
    for ctx in made:
        ctx.close()
    assert errors == [], f"uncaught errors in the pages: {errors}"


def url(gw, path: str, tok: str, ws_urls: list[str], **extra: str) -> str:
    params = "&".join([f"token={tok}", f"urls={','.join(ws_urls)}"] + [f"{k}={v}" for k, v in extra.items()])
    return f"{gw.base_url}{path}#{params}"


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def say(page, text: str) -> None:
    box = page.locator(".composer .input")
    box.fill(text)
    box.press("Enter")


def transcript(page) -> list[dict]:
    """The messages shown, in page order: body, seq, delivery state, mine."""
    return page.eval_on_selector_all(".transcript .msg", """els => els.map(e => ({
        body: e.querySelector('.body').textContent, seq: Number(e.dataset.seq || 0),
        state: e.dataset.state || null, mine: e.classList.contains('mine')}))""")


def violations(page) -> list:
    return page.evaluate("window.parley.client.violations")


def agent_token(user: str, tenant: str, **claims) -> str:
    return token(user, tenant, "agent", skills=["support"], **claims)


def admin(method: str, base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def start_chat(customer, agent) -> None:
    """The customer starts a chat; the agent accepts the offer from its countdown card."""
    customer.locator(".start-chat").click()
    offer = agent.locator(".offers .offer").last
    expect(offer.locator(".countdown")).to_have_text(re.compile(r"^\d+ s$"))
    offer.locator(".accept").click()
    expect(offer).to_have_count(0)
    expect(customer.locator(".conv-state")).to_contain_text("is with you")


def test_chat_survives_a_gateway_sigkill(procs, contexts, tenant):
    """Customer and agent chat through gateway 0; it is SIGKILLed while gateway 1 is still frozen:
    both pages show reconnecting, messages typed meanwhile wait as "sending", and once gateway 1
    answers every message appears exactly once, in the same order, on both sides."""
    gw0, gw1 = procs.gateways
    ws_urls = [gw0.ws_url, gw1.ws_url]
    agent = contexts()
    agent.goto(url(gw0, "/console", agent_token("a1", tenant, name="Alex"), ws_urls))
    expect(agent.locator(".presence")).to_have_attribute("data-status", "online")
    customer = contexts()
    customer.goto(url(gw0, "/widget", token("c1", tenant), ws_urls))
    expect(customer.locator(".conn")).to_have_attribute("data-state", "connected")

    customer.locator(".start-chat").click()
    expect(customer.locator(".queue")).to_contain_text("number 1 in the queue")  # the queue frame
    shot(customer, "01-customer-queued")
    offer = agent.locator(".offers .offer")
    expect(offer.locator(".countdown")).to_have_text(re.compile(r"^\d+ s$"))
    shot(agent, "01-agent-offer")
    offer.locator(".accept").click()
    expect(customer.locator(".conv-state")).to_contain_text("Agent a1 is with you")
    expect(customer.locator(".queue")).to_be_hidden()

    say(customer, "hello, my order is late")
    expect(agent.locator(".msg.theirs .body")).to_have_text(["hello, my order is late"])
    customer.locator(".composer .input").press_sequentially("one more thing")
    expect(agent.locator(".typing")).to_have_text("c1 is typing…")
    customer.locator(".composer .input").fill("")
    say(agent, "let me check")
    expect(customer.locator(".typing")).to_be_hidden()
    # delivery state: stored on ack, read once the other side showed it
    expect(customer.locator(".msg.mine")).to_have_attribute("data-state", "read")
    expect(agent.locator(".msg.mine")).to_have_attribute("data-state", "read")
    expect(customer.locator(".msg.mine .delivery")).to_have_text("Read")
    shot(customer, "02-customer-chatting")

    gw1.freeze()  # the surviving gateway is slow to come to: the outage lasts until it thaws
    try:
        gw0.kill()
        for page in (customer, agent):
            expect(page.locator(".conn")).to_have_attribute("data-state", "reconnecting")
        expect(agent.locator(".presence")).to_have_attribute("data-status", "unknown")
        say(customer, "are you still there?")
        say(customer, "my order number is 4711")
        say(agent, "one moment please")
        expect(customer.locator(".msg[data-state=sending]")).to_have_count(2)
        expect(agent.locator(".msg[data-state=sending]")).to_have_count(1)
        shot(customer, "03-customer-reconnecting")
        shot(agent, "03-agent-reconnecting")
    finally:
        gw1.thaw()
    for page in (customer, agent):
        expect(page.locator(".conn")).to_have_attribute("data-state", "connected")
        expect(page.locator(".msg[data-state=sending]")).to_have_count(0)
        expect(page.locator(".msg")).to_have_count(5)
    expect(agent.locator(".presence")).to_have_attribute("data-status", "online")
    expected = {"hello, my order is late", "let me check", "are you still there?", "my order number is 4711",
                "one moment please"}
    seen = {}
    for name, page in (("customer", customer), ("agent", agent)):
        rows = transcript(page)
        bodies = [r["body"] for r in rows]
        assert sorted(bodies) == sorted(expected), (name, bodies)  # each exactly once
        seqs = [r["seq"] for r in rows]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), (name, rows)
        assert bodies.index("are you still there?") < bodies.index("my order number is 4711")
        assert page.evaluate("window.parley.client.welcome.node") == "gateway-1"
        assert violations(page) == []
        seen[name] = [(r["body"], r["seq"]) for r in rows]
    assert seen["customer"] == seen["agent"]  # the same order on both sides
    shot(customer, "04-customer-after-failover")
    shot(agent, "04-agent-after-failover")
    gw0.restart()


def test_console_shows_the_servers_offline_then_online(procs, contexts, tenant):
    """The console's heartbeats stop while its socket stays open (a frozen tab, a black-holed
    network): the server marks the agent offline and the console says so; heartbeats resume:
    online again. Then the socket is cut for longer than the TTL: the supervisor view shows the
    agent offline, the console reconnects to the server's `online` (reconnected)."""
    gw = procs.gateways[1]
    agent = contexts()
    agent.goto(url(gw, "/console", agent_token("a1", tenant), [gw.ws_url]))
    presence = agent.locator(".presence")
    expect(presence).to_have_attribute("data-status", "online")

    agent.locator(".go-away").click()
    expect(presence).to_have_attribute("data-status", "away")
    expect(presence).to_contain_text("set by agent")
    expect(agent.locator(".go-away")).to_have_attribute("aria-pressed", "true")
    agent.locator(".go-online").click()
    expect(presence).to_have_attribute("data-status", "online")

    agent.evaluate("window.parley.client.stall(20000)")  # the page-side hook: no more pings
    expect(presence).to_have_attribute("data-status", "offline", timeout=PRESENCE_TTL_MS + 3000)
    expect(presence).to_contain_text("heartbeat lost")
    expect(agent.locator(".conn")).to_have_attribute("data-state", "connected")  # the socket looks fine
    shot(agent, "05-agent-offline-heartbeat-lost")
    agent.evaluate("window.parley.client.stall(0)")
    expect(presence).to_have_attribute("data-status", "online")
    expect(presence).to_contain_text("reconnected")
    shot(agent, "06-agent-online-again")

    supervisor = contexts()
    supervisor.goto(url(gw, "/supervisor", token("s1", tenant, "supervisor"), [], every="300"))
    row = supervisor.locator("tr[data-agent=a1]")
    expect(row).to_have_attribute("data-status", "online")
    agent.evaluate(f"window.parley.client.suspend({PRESENCE_TTL_MS + 4000})")  # socket closed, no reconnect
    expect(agent.locator(".conn")).to_have_attribute("data-state", "reconnecting")
    expect(row).to_have_attribute("data-status", "offline")
    shot(supervisor, "07-supervisor-agent-offline")
    expect(agent.locator(".conn")).to_have_attribute("data-state", "connected")
    expect(presence).to_have_attribute("data-status", "online")
    expect(presence).to_contain_text("reconnected")
    expect(row).to_have_attribute("data-status", "online")


def test_console_with_several_chats_survives_a_reload(procs, contexts, tenant):
    """Two chats at once; the console is reloaded mid-chat and rebuilds both from welcome.convs
    and the stream; then one is transferred to tier 2 and the other closed; the supervisor view
    follows agents' load and the queues."""
    gw0, gw1 = procs.gateways
    ws_urls = [gw1.ws_url, gw0.ws_url]
    agent = contexts()
    agent.goto(url(gw1, "/console", agent_token("a1", tenant), ws_urls, queues="tier2"))
    expect(agent.locator(".presence")).to_have_attribute("data-status", "online")
    customers = []
    for name in ("c1", "c2"):
        page = contexts()
        page.goto(url(gw0, "/widget", token(name, tenant), [gw0.ws_url, gw1.ws_url]))
        expect(page.locator(".conn")).to_have_attribute("data-state", "connected")
        start_chat(page, agent)
        customers.append(page)
    c1, c2 = customers
    convs = agent.locator(".convs .conv")
    expect(convs).to_have_count(2)

    say(c1, "first customer here")
    say(c2, "second customer, <b>not bold</b>")
    for i, page in enumerate(customers):
        agent.locator(".convs .conv").nth(i).click()
        expect(agent.locator(".msg.theirs")).to_have_count(1)
        say(agent, f"hello customer {i + 1}")
        expect(page.locator(".msg.theirs .body")).to_have_text([f"hello customer {i + 1}"])
    supervisor = contexts()
    supervisor.goto(url(gw1, "/supervisor", token("s1", tenant, "supervisor"), [], every="300"))
    expect(supervisor.locator("tr[data-agent=a1] .load")).to_have_text("2/3")
    before = {}
    for i in range(2):
        agent.locator(".convs .conv").nth(i).click()
        expect(agent.locator(".msg")).to_have_count(2)
        before[i] = transcript(agent)
    shot(agent, "08-agent-two-chats")

    agent.reload()
    expect(agent.locator(".conn")).to_have_attribute("data-state", "connected")
    expect(convs).to_have_count(2)
    for i in range(2):
        agent.locator(".convs .conv").nth(i).click()
        expect(agent.locator(".convs .conv").nth(i)).to_have_attribute("data-state", "assigned")
        expect(agent.locator(".msg")).to_have_count(2)
        assert [(r["body"], r["seq"]) for r in transcript(agent)] == [(r["body"], r["seq"]) for r in before[i]]
    expect(agent.locator(".msg.theirs .body")).to_have_text(["second customer, <b>not bold</b>"])  # text, not markup
    assert agent.locator(".transcript b").count() == 0
    shot(agent, "09-agent-after-reload")
    assert violations(agent) == []

    say(agent, "typed after the reload")  # conversation 2 is selected
    expect(c2.locator(".msg.theirs .body")).to_have_text(["hello customer 2", "typed after the reload"])
    agent.locator(".transfer-queue").fill("tier2")
    agent.locator(".transfer").click()
    expect(agent.locator(".convs .conv").nth(1)).to_have_attribute("data-state", "ended")
    expect(agent.locator(".chat-state")).to_contain_text("transferred to tier2")
    expect(c2.locator(".transcript .system.transferred")).to_contain_text("from support to tier2")
    expect(c2.locator(".conv-state")).to_contain_text("Waiting for an agent")

    agent.locator(".convs .conv").nth(0).click()
    agent.locator(".close-conv").click()
    expect(agent.locator(".convs .conv").nth(0)).to_have_attribute("data-state", "ended")
    expect(c1.locator(".conv-state")).to_have_text("This conversation has ended.")
    expect(c1.locator(".composer .input")).to_be_disabled()
    expect(c1.locator(".start-chat")).to_be_visible()
    expect(supervisor.locator("tr[data-agent=a1] .load")).to_have_text("0/3")
    expect(supervisor.locator("tr[data-queue=tier2] .depth")).to_have_text("1")
    shot(supervisor, "10-supervisor")
    shot(c1, "10-customer-closed")


def test_widget_embedded_with_one_script_tag(procs, contexts, tenant):
    """Another site embeds the widget with one module script tag: queue position, the staffing
    notice, an incident banner and its all-clear, and a hostile message body shown as text."""
    gw = procs.gateways[1]
    tag = (f'<script type="module" src="{gw.base_url}/web/widget.js" data-token="{token("c9", tenant)}" '
           f'data-queue="support" data-label="Help"></script>')
    html = f"<!doctype html><title>Shop</title><h1>Shop</h1>{tag}".encode()

    class Shop(http.server.BaseHTTPRequestHandler):  # another site (another origin) on loopback
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Shop)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = contexts()
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.locator(".launcher").click()
        expect(page.locator(".parley-widget .conn")).to_have_attribute("data-state", "connected")
        page.locator(".start-chat").click()
        expect(page.locator(".queue")).to_contain_text("number 1 in the queue")
        expect(page.locator(".transcript .system.notice")).to_contain_text("No agent for this queue is online")

        hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
        say(page, hostile)
        expect(page.locator(".msg.mine .body")).to_have_text(hostile)
        expect(page.locator(".msg.mine")).to_have_attribute("data-state", "sent")
        assert page.evaluate("window.pwned === undefined")
        assert page.locator(".parley-widget img, .parley-widget script").count() == 0

        notice = admin("POST", gw.base_url, "/v1/notices", {"tenant": tenant, "level": "critical", "text": "Payments are down"})
        banner = page.locator(f".banner[data-notice={notice['id']}]")
        expect(banner).to_have_text("Payments are down")
        expect(banner).to_have_attribute("data-level", "critical")
        shot(page, "11-embedded-widget-incident")
        admin("DELETE", gw.base_url, f"/v1/notices/{notice['id']}")
        expect(banner).to_have_text("Resolved: Payments are down")
        expect(banner).to_have_attribute("data-level", "info")
    finally:
        server.shutdown()


def test_demo_page_links_the_three_with_working_tokens(procs, contexts):
    """`make run` opens to the demo page: its links carry demo tokens that work."""
    gw = procs.gateways[1]
    page = contexts()
    page.goto(gw.base_url + "/")
    links = page.locator(".demo-links a")
    expect(links).to_have_count(5)
    shot(page, "12-demo-page")
    for label, ready in (("Customer widget", (".conn", "data-state", "connected")),
                         ("Agent console (agent-2)", (".presence", "data-status", "online")),
                         ("Supervisor view", ("tr[data-agent=agent-2]", "data-status", "online"))):
        with page.context.expect_page() as opened:
            page.get_by_role("link", name=label).click()
        target = opened.value
        selector, attribute, value = ready
        expect(target.locator(selector)).to_have_attribute(attribute, value)
