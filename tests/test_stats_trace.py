"""Tests of vblk.stats.trace: Chrome trace JSON from stage records made on a fake clock."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from vblk.stats.stages import KIND_READ, KIND_WRITE, QueueStages, TraceResult
from vblk.stats.trace import EVENTS_TID, chrome_trace

STAGE_SLICES = {"queue_wait", "backend", "device", "host_io", "complete", "notify"}


def _traced(queue: int, inflight: int, batches: int) -> TraceResult:
    """A queue that pops ``inflight`` requests per kick and completes them together."""
    now = 5_000_000
    st = QueueStages(64, sample_every=32)
    st.start_trace(1, 10_000)
    for b in range(batches):
        now += 3_000
        st.woke(now)
        st.pass_started(now)
        for h in range(inflight):
            now += 700
            st.popped(h, now)
            now += 1_100
            st.submitted(h, now, KIND_WRITE if h % 2 else KIND_READ, (b * 64 + h) * 4096, 4096)
        for h in range(inflight):
            now += 9_000
            st.completed(h, now)
            now += 300
            st.pushed(h, now)
        now += 2_000
        st.notified(now)
    return st.stop_trace(queue)


def _load(trace: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(trace))
    return loaded


def test_every_request_has_a_slice_per_stage_with_args() -> None:
    trace = _load(chrome_trace("disk0", [_traced(0, 4, 5), _traced(1, 1, 3)]))
    assert trace["otherData"]["requests"] == 4 * 5 + 3
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    by_name: dict[str, int] = defaultdict(int)
    for e in slices:
        by_name[e["name"]] += 1
        assert set(e["args"]) == {"type", "offset", "length"}
        assert e["args"]["type"] in ("read", "write") and e["args"]["length"] == 4096
        assert e["dur"] >= 0
    assert by_name == dict.fromkeys(STAGE_SLICES, 23)


def test_kicks_and_interrupts_are_instants_on_the_queue_track() -> None:
    trace = _load(chrome_trace("disk0", [_traced(3, 2, 4)]))
    instants = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert sorted(e["name"] for e in instants) == ["irq"] * 4 + ["kick"] * 4
    assert {(e["pid"], e["tid"]) for e in instants} == {(4, EVENTS_TID)}
    names = [e for e in trace["traceEvents"] if e["name"] == "process_name"]
    assert names[0]["args"]["name"] == "queue 3"


def test_slices_on_a_lane_nest_and_stages_tile_backend() -> None:
    trace = _load(chrome_trace("disk0", [_traced(0, 8, 6)]))
    lanes: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            start = round(e["ts"] * 1000)
            lanes[(e["pid"], e["tid"])].append((start, start + round(e["dur"] * 1000), e["name"]))
    assert len(lanes) > 1  # overlapping requests are spread over lanes
    for spans in lanes.values():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple[int, int, str]] = []
        parts = 0
        for start, end, name in spans:
            while stack and stack[-1][1] <= start and not (start == end == stack[-1][1]):
                stack.pop()
            if stack:  # nested: inside its parent
                assert stack[-1][0] <= start and end <= stack[-1][1], (stack[-1], name)
            if name == "backend":
                parts = 0
            elif name in ("device", "host_io", "complete", "notify"):
                parts += end - start
                if name == "notify":
                    backend = [s for s in stack if s[2] == "backend"][-1]
                    assert parts == backend[1] - backend[0]
            stack.append((start, end, name))


def test_empty_trace_is_valid() -> None:
    st = QueueStages(4)
    st.start_trace(1, 10)
    trace = _load(chrome_trace("disk0", [st.stop_trace(0)], {"duration_s": 1.0}))
    assert trace["otherData"]["requests"] == 0 and trace["otherData"]["duration_s"] == 1.0
    assert all(e["ph"] == "M" for e in trace["traceEvents"])
