"""G8: one message, one connected trace across separate processes, exported over OTLP/HTTP."""

from __future__ import annotations

import gzip
from collections import defaultdict

import pytest
from aiohttp import web
from helpers import ADMIN, SECRET, eventually, token
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from parley.client import ParleyClient
from parley.testing.nats_server import free_port
from parley.testing.processes import Stack


class OtlpReceiver:
    """A minimal OTLP/HTTP trace endpoint: keeps every span with its service name."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append({
                        "service": attrs.get("service.name"), "instance": attrs.get("service.instance.id"),
                        "name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(), "kind": s.kind,
                        "attrs": {a.key: a.value.string_value or a.value.int_value for a in s.attributes},
                    })
        return web.Response(status=200, content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()


@pytest.fixture
async def receiver():
    r = OtlpReceiver()
    await r.start()
    yield r
    await r.runner.cleanup()


async def test_one_message_one_trace_across_processes(nats_server, receiver, tmp_path, tenant):
    env = {
        "PARLEY_JWT_SECRET": SECRET, "PARLEY_ADMIN_KEY": ADMIN, "PARLEY_ROUTING_MODE": "auto",
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    stack = Stack([nats_server.url], env=env, data_dir=str(tmp_path),
                  counts={"gateway": 2, "router": 1, "presence": 1, "transcript": 1}).start()
    try:
        gw_customer, gw_agent = stack.gateways
        agent = ParleyClient(gw_agent.ws_url, token("a1", tenant, "agent", skills=["support"]))
        await agent.connect()
        customer = ParleyClient(gw_customer.ws_url, token("c1", tenant))
        await customer.connect()
        conv = await customer.open("support")
        await agent.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "assigned", timeout=15)
        ack = await customer.send(conv, "follow me")
        await agent.wait_for(lambda f: f.get("t") == "ev" and f["seq"] == ack["seq"], timeout=10)
        seq = str(ack["seq"])

        def message_trace():
            by_trace = defaultdict(list)
            for s in receiver.spans:
                by_trace[s["trace"]].append(s)
            for spans in by_trace.values():
                names = {(s["service"], s["instance"], s["name"]) for s in spans}
                if {("parley-gateway", "gateway-0", "receive send"),
                        ("parley-gateway", "gateway-0", "publish conv.{tenant}.{conv}"),
                        ("parley-transcript", "transcript-0", "process conv.{tenant}.{conv}"),
                        ("parley-gateway", "gateway-1", "deliver live.conv.{tenant}.{conv}")} <= names:
                    return spans
            return None

        spans = await eventually(message_trace, timeout=20, what="a complete trace of the message")
        by_name = {}
        for s in spans:
            by_name.setdefault(s["name"], []).append(s)
        receive = by_name["receive send"][0]
        publish = by_name["publish conv.{tenant}.{conv}"][0]
        assert publish["parent"] == receive["id"] and receive["instance"] == "gateway-0"
        assert publish["attrs"]["messaging.system"] == "nats"
        assert publish["attrs"]["messaging.message.id"] == seq
        process = by_name["process conv.{tenant}.{conv}"][0]
        assert process["parent"] == publish["id"]
        delivered = [s for s in by_name["deliver live.conv.{tenant}.{conv}"] if s["instance"] == "gateway-1"]
        assert delivered and delivered[0]["parent"] == publish["id"]
        assert delivered[0]["attrs"]["messaging.message.id"] == seq
        assert all(s["trace"] == receive["trace"] for s in (publish, process, delivered[0]))
        await customer.close()
        await agent.close()
    finally:
        stack.stop()
