"""Prometheus metrics of a gateway: what came in, what was refused and why, how long it took.

Each :class:`GatewayMetrics` owns its own ``CollectorRegistry`` by default
(not prometheus_client's global one), so several logical gateways, or tests,
in one process never collide on metric names; ``serve_metrics`` exposes
whichever registry it is given. Labels are bounded: ``gateway`` (config),
``transport`` (``coap`` / ``mqtt`` / ``local``), ``outcome`` (three values)
and ``reason`` (the fixed :data:`devices.reasons.REASONS`), never device ids,
so the series count cannot be driven up by senders.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from devices.reasons import REASONS

__all__ = ["OUTCOMES", "GatewayMetrics", "serve_metrics"]

OUTCOMES = ("accepted", "duplicate", "rejected")

# validation of a 50 KB update takes ~0.3-3 ms; a few buckets either side
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0)


class GatewayMetrics:
    """Counters, a latency histogram and round gauges for one or more logical gateways."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.updates = Counter(
            "tierfl_gateway_updates_total",
            "Updates received, by outcome (accepted / duplicate / rejected).",
            ("gateway", "transport", "outcome"),
            registry=r,
        )
        self.rejections = Counter(
            "tierfl_gateway_rejections_total",
            "Rejected updates, by reason code.",
            ("gateway", "transport", "reason"),
            registry=r,
        )
        self.validation_seconds = Histogram(
            "tierfl_gateway_validation_seconds",
            "Time to validate and take in one update (size check to aggregate).",
            ("gateway", "transport"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.round = Gauge(
            "tierfl_gateway_round", "Round the gateway is serving.", ("gateway",), registry=r
        )
        self.round_open = Gauge(
            "tierfl_gateway_round_open",
            "1 while the round accepts updates, else 0.",
            ("gateway",),
            registry=r,
        )
        self.buffered = Gauge(
            "tierfl_gateway_buffered_updates",
            "Accepted updates folded into the current round's partial aggregate.",
            ("gateway",),
            registry=r,
        )
        self.transfers = Gauge(
            "tierfl_gateway_transfers_in_progress",
            "Unfinished transfers held by a transport (e.g. partial CoAP block-wise uploads).",
            ("gateway", "transport"),
            registry=r,
        )

    def record(
        self, gateway: str, transport: str, outcome: str, reason: str | None, seconds: float
    ) -> None:
        """Count one submitted update (and its reason, when rejected) and its latency."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r} (known: {', '.join(OUTCOMES)})")
        self.updates.labels(gateway, transport, outcome).inc()
        if outcome == "rejected":
            if reason not in REASONS:
                raise ValueError(f"unknown rejection reason {reason!r}")
            self.rejections.labels(gateway, transport, reason).inc()
        self.validation_seconds.labels(gateway, transport).observe(seconds)

    def set_round(self, gateway: str, round_: int, *, open_: bool, buffered: int) -> None:
        self.round.labels(gateway).set(round_)
        self.round_open.labels(gateway).set(1 if open_ else 0)
        self.buffered.labels(gateway).set(buffered)

    # --- reading back (tests, health endpoints) ---------------------------------------

    def updates_count(self, gateway: str, outcome: str, transport: str | None = None) -> float:
        """Updates with ``outcome`` on ``transport`` (all transports when None)."""
        return self._sum("tierfl_gateway_updates_total", gateway, transport, outcome=outcome)

    def rejections_count(self, gateway: str, reason: str, transport: str | None = None) -> float:
        """Rejections for ``reason`` on ``transport`` (all transports when None)."""
        return self._sum("tierfl_gateway_rejections_total", gateway, transport, reason=reason)

    def _sum(self, name: str, gateway: str, transport: str | None, **labels: str) -> float:
        total = 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name != name or s.labels.get("gateway") != gateway:
                    continue
                if transport is not None and s.labels.get("transport") != transport:
                    continue
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


def serve_metrics(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry | GatewayMetrics | None = None
) -> WSGIServer:
    """Expose ``registry`` (or a GatewayMetrics' registry) at http://host:port/metrics.

    Binds to loopback by default: metrics name gateways and reveal traffic
    patterns, so exposing them further is a deliberate choice. Returns the
    server (``.shutdown()`` stops it; ``.server_port`` is the bound port when
    ``port`` was 0). Without a registry, prometheus_client's global one.
    """
    if isinstance(registry, GatewayMetrics):
        registry = registry.registry
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
