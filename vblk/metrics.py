"""The daemon's HTTP endpoint: Prometheus metrics at ``/metrics``, and any other routes.

``/metrics`` is rendered by prometheus_client from :class:`StatsCollector`,
which turns one ``export-stats`` snapshot into metric families at each
scrape (no state kept here). Names follow Prometheus conventions: the
``vblk_`` prefix, ``_total`` counters, seconds and bytes, labels ``export``
and ``queue``. Latency histograms come from the queues' stage histograms
(:mod:`vblk.stats.histogram`), with its fixed bucket bounds.

:attr:`MetricsServer.routes` maps a path to a handler, so more pages can be
served from the same port: ``routes["/x"] = lambda query: (200, "text/plain", b"...")``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from vblk.errors import VblkError

log = logging.getLogger(__name__)

__all__ = ["MetricsError", "MetricsServer", "StatsCollector", "parse_address"]

Snapshot = Callable[[], dict[str, Any]]
#: A route: query parameters in; status, content type and body out.
Route = Callable[[dict[str, list[str]]], tuple[int, str, bytes]]

#: (snapshot key, metric name without vblk_ and _total, help) of the per-queue counters.
QUEUE_COUNTERS = (
    ("requests", "requests", "Requests completed"),
    ("read_ops", "read_ops", "Read requests started"),
    ("write_ops", "write_ops", "Write requests started"),
    ("read_bytes", "read_bytes", "Bytes read"),
    ("write_bytes", "write_bytes", "Bytes written"),
    ("flushes", "flushes", "Flush requests"),
    ("discards", "discards", "Discard requests"),
    ("write_zeroes", "write_zeroes", "Write-zeroes requests"),
    ("errors", "errors", "Requests completed with an error status"),
    ("kicks", "kicks", "Kicks (notifications) received from the driver"),
    ("interrupts", "interrupts", "Interrupts sent to the driver"),
)
QUEUE_GAUGES = (
    ("inflight", "inflight_requests", "Requests submitted to storage and not yet completed"),
    ("held", "held_interrupts", "Interrupts held back by coalescing"),
)


class MetricsError(VblkError):
    """The metrics endpoint cannot start as asked."""


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or [V6]:PORT, or :PORT for every address) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsError(f"--metrics {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class StatsCollector(Collector):
    """Metric families from one stats snapshot per scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        exports = snap.get("exports", [])
        counters = {
            key: CounterMetricFamily(f"vblk_{name}", help_, labels=["export", "queue"])
            for key, name, help_ in QUEUE_COUNTERS
        }
        gauges = {
            key: GaugeMetricFamily(f"vblk_{name}", help_, labels=["export", "queue"])
            for key, name, help_ in QUEUE_GAUGES
        }
        restarts = CounterMetricFamily(
            "vblk_export_restarts",
            "Times the export's worker died and was restarted",
            labels=["export"],
        )
        size = GaugeMetricFamily("vblk_export_size_bytes", "Size of the export", labels=["export"])
        attached = GaugeMetricFamily(
            "vblk_export_attached", "1 while a frontend is attached", labels=["export"]
        )
        up = GaugeMetricFamily(
            "vblk_export_up", "1 while the export's worker serves", labels=["export"]
        )
        stages = HistogramMetricFamily(
            "vblk_stage_seconds",
            "Time requests spent in each stage of the path (sampled)",
            labels=["export", "queue", "stage"],
        )
        bounds: tuple[float, ...] = ()
        for e in exports:
            eid = str(e["id"])
            restarts.add_metric([eid], e.get("restarts", 0))
            size.add_metric([eid], e.get("size", 0))
            state = e.get("state")
            attached.add_metric([eid], 1 if state == "attached" else 0)
            up.add_metric([eid], 1 if state in ("attached", "listening") else 0)
            for q in e.get("queues", []):
                labels = [eid, str(q["queue"])]
                for key, fam in counters.items():
                    fam.add_metric(labels, q.get(key, 0))
                for key, gfam in gauges.items():
                    gfam.add_metric(labels, q.get(key, 0))
                for stage, h in q.get("stages", {}).items():
                    if not bounds:
                        from vblk.stats.histogram import BOUNDS_SECONDS

                        bounds = BOUNDS_SECONDS
                    stages.add_metric(
                        [*labels, stage], _cumulative(bounds, h["buckets"]), h["sum_ns"] / 1e9
                    )
        yield from counters.values()
        yield from gauges.values()
        yield restarts
        yield size
        yield attached
        yield up
        yield stages


def _cumulative(bounds: tuple[float, ...], buckets: list[int]) -> list[tuple[str, float]]:
    """Prometheus' cumulative ``le`` buckets from per-bucket counts (the last is +Inf)."""
    out: list[tuple[str, float]] = []
    running = 0
    for i, count in enumerate(buckets):
        running += count
        le = repr(bounds[i]) if i < len(bounds) else "+Inf"
        out.append((le, running))
    if not out or out[-1][0] != "+Inf":
        out.append(("+Inf", running))
    return out


class MetricsServer:
    """A small threaded HTTP server: ``/metrics`` plus whatever :attr:`routes` holds."""

    def __init__(self, address: str, snapshot: Snapshot) -> None:
        host, port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(snapshot))
        self.snapshot = snapshot
        self.routes: dict[str, Route] = {"/metrics": self._metrics}
        self._add_stats_pages()
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            server_version = "vblk"

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                route = routes.get(url.path)
                if route is None:
                    status, ctype, body = 404, "text/plain", b"not found\n"
                else:
                    try:
                        status, ctype, body = route(parse_qs(url.query))
                    except Exception:
                        log.exception("metrics: %s failed", url.path)
                        status, ctype, body = 500, "text/plain", b"internal error\n"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise MetricsError(f"--metrics {address}: {e.strerror or e}") from None
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="vblk-metrics", daemon=True
        )

    def _metrics(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def _add_stats_pages(self) -> None:
        """The live page of :mod:`vblk.stats.page` at ``/`` and its data at ``/api/stats``."""
        from vblk.stats.page import LiveStats, page_html

        live = LiveStats(self.snapshot)
        html = page_html().encode()
        self.routes["/"] = lambda q: (200, "text/html; charset=utf-8", html)
        self.routes["/api/stats"] = lambda q: (
            200,
            "application/json",
            live.payload_json(q.get("export", [""])[0]),
        )

    def start(self) -> None:
        self._thread.start()
        log.info("metrics at http://%s:%d/metrics", self.address[0], self.address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
