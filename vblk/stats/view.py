"""Rates and windowed percentiles from two ``export-stats`` results.

``vblk top``, the live page and the SVG all show the same numbers: counters
turned into rates over the interval between two snapshots, and each stage's
percentiles over the requests timed in that interval (or since the start
when there is no earlier snapshot). Input is untrusted JSON from the control
socket: anything missing or malformed reads as zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, cast

from vblk.stats.histogram import NBUCKETS, StageSnapshot, delta_snapshot
from vblk.stats.stages import STAGES


class StageView(TypedDict):
    count: int
    p50_ns: int
    p99_ns: int
    p999_ns: int


class QueueView(TypedDict):
    queue: str
    read_iops: float
    write_iops: float
    iops: float
    read_mbps: float
    write_mbps: float
    inflight: int
    kicks_per_req: float
    irqs_per_req: float
    held: float
    errors: int
    stages: dict[str, StageView]


class ExportView(TypedDict):
    id: str
    state: str
    queues: list[QueueView]
    total: QueueView


def _num(d: Mapping[str, Any], key: str) -> int:
    v = d.get(key, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _stage(d: Any) -> StageSnapshot | None:
    """A stage snapshot if ``d`` is a well-formed one, else None."""
    if not isinstance(d, dict):
        return None
    buckets = d.get("buckets")
    if not isinstance(buckets, list) or len(buckets) != NBUCKETS:
        return None
    if not all(isinstance(c, int) for c in buckets):
        return None
    if not isinstance(d.get("count"), int) or not isinstance(d.get("sum_ns"), int):
        return None
    return cast(StageSnapshot, d)


def _stages(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> dict[str, StageView]:
    out: dict[str, StageView] = {}
    a_all = after.get("stages")
    b_all = before.get("stages") if before is not None else None
    for name in STAGES:
        a = _stage(a_all.get(name)) if isinstance(a_all, dict) else None
        if a is None:
            out[name] = {"count": 0, "p50_ns": 0, "p99_ns": 0, "p999_ns": 0}
            continue
        b = _stage(b_all.get(name)) if isinstance(b_all, dict) else None
        snap = delta_snapshot(b, a) if b is not None else a
        out[name] = {
            "count": snap["count"],
            "p50_ns": snap["p50_ns"],
            "p99_ns": snap["p99_ns"],
            "p999_ns": snap["p999_ns"],
        }
    return out


def queue_view(
    before: Mapping[str, Any] | None, after: Mapping[str, Any], dt: float, name: str
) -> QueueView:
    """One queue's (or an export's total) rates over ``dt`` seconds."""
    if before is not None and _num(after, "requests") < _num(before, "requests"):
        before = None  # the export restarted: its counters began again
    dt = dt if before is not None and dt > 0 else 0.0

    def rate(key: str) -> float:
        if not dt or before is None:
            return 0.0
        return max(0, _num(after, key) - _num(before, key)) / dt

    def per_req(key: str) -> float:
        reqs = _num(after, "requests") - (_num(before, "requests") if before else 0)
        n = _num(after, key) - (_num(before, key) if before else 0)
        return n / reqs if reqs > 0 else 0.0

    reads, writes = rate("read_ops"), rate("write_ops")
    return {
        "queue": name,
        "read_iops": reads,
        "write_iops": writes,
        "iops": rate("requests"),
        "read_mbps": rate("read_bytes") / 1e6,
        "write_mbps": rate("write_bytes") / 1e6,
        "inflight": _num(after, "inflight"),
        "kicks_per_req": per_req("kicks"),
        "irqs_per_req": per_req("interrupts"),
        "held": rate("held"),
        "errors": _num(after, "errors"),
        "stages": _stages(before, after),
    }


def _exports(stats: Any) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    exports = stats.get("exports") if isinstance(stats, dict) else None
    if isinstance(exports, list):
        for e in exports:
            if isinstance(e, dict) and isinstance(e.get("id"), str):
                out[e["id"]] = e
    return out


def export_views(before: Any, after: Any, dt: float) -> list[ExportView]:
    """Every export of ``after``, with rates against the same export in ``before``."""
    prev = _exports(before)
    views: list[ExportView] = []
    for eid, exp in _exports(after).items():
        old = prev.get(eid)
        old_queues = {}
        if old is not None and isinstance(old.get("queues"), list):
            old_queues = {_num(q, "queue"): q for q in old["queues"] if isinstance(q, dict)}
        queues = []
        for q in exp.get("queues") or []:
            if isinstance(q, dict):
                qi = _num(q, "queue")
                queues.append(queue_view(old_queues.get(qi), q, dt, str(qi)))
        tot_a = exp.get("total")
        tot_b = old.get("total") if old is not None else None
        total = queue_view(
            tot_b if isinstance(tot_b, dict) else None,
            tot_a if isinstance(tot_a, dict) else {},
            dt,
            "all",
        )
        state = exp.get("state")
        views.append(
            {
                "id": eid,
                "state": state if isinstance(state, str) else "?",
                "queues": queues,
                "total": total,
            }
        )
    return views


def fmt_ns(ns: int) -> str:
    """A latency for people: 850 ns, 12.3 µs, 4.56 ms, 1.20 s."""
    if ns <= 0:
        return "-"
    if ns < 1_000:
        return f"{ns} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.3g} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.3g} ms"
    return f"{ns / 1e9:.3g} s"


def fmt_rate(per_s: float) -> str:
    """A rate for people: 950/s, 12.3k/s, 1.2M/s."""
    if per_s < 1_000:
        return f"{per_s:.0f}/s"
    if per_s < 1_000_000:
        return f"{per_s / 1e3:.3g}k/s"
    return f"{per_s / 1e6:.3g}M/s"
