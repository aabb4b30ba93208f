"""OpenTelemetry, configured only by the standard ``OTEL_*`` variables, and W3C context in NATS headers.

Tracing is off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``); the
helpers below are cheap no-ops then.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import context, propagate, trace

log = logging.getLogger("parley.telemetry")
_configured = False


def setup(service: str, node_id: str) -> None:
    """Install a tracer provider when an exporter is asked for; idempotent."""
    global _configured
    if _configured:
        return
    _configured = True
    exporter_names = [e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if not exporter_names or exporter_names == ["none"]:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"parley-{service}"), "service.instance.id": node_id}
    provider = TracerProvider(resource=Resource.create(attrs))
    for name in exporter_names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored", name)
    trace.set_tracer_provider(provider)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def enabled() -> bool:
    """True once a real tracer provider is installed (spans per message cost only then)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def inject(headers: dict[str, str], ctx: context.Context | None = None) -> None:
    """Put ``traceparent`` (of ``ctx``, or of the current span) into NATS headers."""
    propagate.inject(headers, context=ctx)


def extract(headers: dict[str, Any] | None) -> context.Context:
    return propagate.extract(headers or {})


# Spans are named by subject *template*, never the raw subject (unbounded cardinality).
CONV_TEMPLATE = "conv.{tenant}.{conv}"
LIVE_TEMPLATE = "live.conv.{tenant}.{conv}"


def messaging_attributes(operation: str, template: str, message_id: int | str | None = None,
                         **extra: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": template,
        "messaging.destination.template": template,
        "messaging.operation.type": operation,
    }
    if message_id is not None:
        attrs["messaging.message.id"] = str(message_id)  # the stream sequence
    attrs.update(extra)
    return attrs


def start_span(name: str, kind: trace.SpanKind, parent: context.Context | None = None,
               attributes: dict[str, Any] | None = None, tracer_name: str = "parley") -> trace.Span:
    return tracer(tracer_name).start_span(name, context=parent, kind=kind, attributes=attributes)


def child_context(span: trace.Span) -> context.Context:
    return trace.set_span_in_context(span)
