"""Gateway metrics (Prometheus, names prefixed ``parley_gateway_``)."""

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("parley_gateway_connections", "Open WebSocket connections")
FRAMES_IN = Counter("parley_gateway_frames_in_total", "Client frames received", ["type"])
FRAMES_OUT = Counter("parley_gateway_frames_out_total", "Frames queued to clients", ["type"])
NACKS = Counter("parley_gateway_nacks_total", "send frames refused, by code", ["code"])
ACK_LATENCY = Histogram(
    "parley_gateway_ack_latency_seconds",
    "From receiving a send to its JetStream PubAck",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SLOW_CONSUMERS = Counter("parley_gateway_slow_consumer_disconnects_total", "Connections closed for not reading")
NATS_CONNECTED = Gauge("parley_gateway_nats_connected", "1 while the gateway's NATS connection is up")
