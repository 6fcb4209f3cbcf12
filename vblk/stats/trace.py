"""Chrome trace event JSON from traced requests, for Perfetto's UI or ``chrome://tracing``.

Layout: one process per queue (``queue N``). Its first thread track holds the
kicks and interrupts as instant events; the requests follow on "lane" thread
tracks. A queue keeps many requests in flight and complete ("X") slices on
one thread must nest, so each request goes to the first lane that is free
over its whole span (wake-up to interrupt); a queue with one request in
flight at a time uses one lane.

Each request is a ``queue_wait`` slice followed by a ``backend`` slice that
holds ``device``, ``host_io``, ``complete`` and ``notify`` exactly (they tile
it). Every slice carries the request's type, offset and length as args.
Timestamps are microseconds with nanosecond decimals, from the first one.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from vblk.stats.stages import KINDS, TraceResult

#: The thread id of a queue's kick/interrupt track; lanes are 1, 2, ...
EVENTS_TID = 0


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def _lanes(spans: Sequence[tuple[int, int]]) -> list[int]:
    """Lane (1-based) of each span, sorted by start: the lowest lane free at its start."""
    free: list[int] = []  # lanes whose last span ended, as a heap
    busy: list[tuple[int, int]] = []  # (end, lane) heap
    nlanes = 0
    out = []
    for start, end in spans:
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            nlanes += 1
            lane = nlanes
        heapq.heappush(busy, (end, lane))
        out.append(lane)
    return out


def chrome_trace(
    export: str, results: Sequence[TraceResult], other: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The trace as a JSON-ready dict (``{"traceEvents": [...], ...}``)."""
    starts = [r[0] for res in results for r in res["requests"]]
    starts += [ns for res in results for _, ns in res["events"]]
    t0 = min(starts) if starts else 0
    events: list[dict[str, Any]] = []
    total = 0
    for res in results:
        q = res["queue"]
        pid = q + 1
        events.append(
            {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"queue {q}"}}
        )
        events.append(
            {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": q}}
        )
        events.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": pid,
                "tid": EVENTS_TID,
                "args": {"name": "kicks, interrupts"},
            }
        )
        for name, ns in res["events"]:
            events.append(
                {
                    "ph": "i",
                    "s": "t",
                    "name": name,
                    "cat": "vblk",
                    "ts": _us(ns - t0),
                    "pid": pid,
                    "tid": EVENTS_TID,
                }
            )
        reqs = sorted(res["requests"])
        lanes = _lanes([(r[0], r[5]) for r in reqs])
        for lane in sorted(set(lanes)):
            events.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": pid,
                    "tid": lane,
                    "args": {"name": f"requests {lane}"},
                }
            )
        for (wake, pop, sub, done, push, irq, kind, offset, length), lane in zip(
            reqs, lanes, strict=True
        ):
            args = {
                "type": KINDS[kind] if 0 <= kind < len(KINDS) else "other",
                "offset": offset,
                "length": length,
            }
            for name, a, b in (
                ("queue_wait", wake, pop),
                ("backend", pop, irq),
                ("device", pop, sub),
                ("host_io", sub, done),
                ("complete", done, push),
                ("notify", push, irq),
            ):
                events.append(
                    {
                        "ph": "X",
                        "name": name,
                        "cat": "vblk",
                        "ts": _us(a - t0),
                        "dur": _us(b - a),
                        "pid": pid,
                        "tid": lane,
                        "args": args,
                    }
                )
        total += len(reqs)
    meta: dict[str, Any] = {
        "export": export,
        "requests": total,
        "dropped": sum(res["dropped"] for res in results),
        "sample_every": max((res["sample_every"] for res in results), default=1),
    }
    meta.update(other or {})
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": meta}
