"""``vblk trace``: record an export's requests for a while as a Chrome trace (Perfetto).

The export does the recording (the ``export-trace`` control method, see
:mod:`vblk.stats.tracing`); this command asks for it, turns the records into
Chrome trace event JSON (:mod:`vblk.stats.trace`) and prints what the trace
cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vblk.cli import positive_float_upto
from vblk.errors import VblkError
from vblk.stats.rpc import call
from vblk.stats.trace import chrome_trace
from vblk.stats.tracing import BASELINE_S, MAX_DURATION


class TraceError(VblkError):
    """The trace could not be taken or written."""


_duration = positive_float_upto(MAX_DURATION, "seconds")
_fraction = positive_float_upto(1, "(a fraction)")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="record an export's requests as a Chrome trace (opens in Perfetto)",
        description="Ask an export to record every request (or a sampled fraction) for a "
        "while, then write Chrome trace event JSON: a track per queue, a slice per stage, "
        "kicks and interrupts as instants.",
    )
    p.add_argument("--control", required=True, metavar="PATH", help="the daemon's control socket")
    p.add_argument("--export", required=True, metavar="ID", help="the export to trace")
    p.add_argument("--duration", type=_duration, default=5.0, metavar="S", help="seconds (5)")
    p.add_argument("--output", required=True, metavar="FILE.json", help="where to write it")
    p.add_argument(
        "--sample", type=_fraction, default=1.0, metavar="F", help="fraction of requests (1)"
    )
    p.set_defaults(func=cmd_trace)


def summary(result: dict[str, Any]) -> str:
    """One paragraph on what was traced and what it cost."""
    c = result["cost"]
    return (
        f"traced {c['requests_traced']} requests in {result['duration_s']:.1f}s "
        f"(1 in {result['sample_every']}; {c['dropped']} dropped, "
        f"{c['requests_during']} served); IOPS {c['tracing_iops']:.0f} while tracing "
        f"vs {c['baseline_iops']:.0f} just before; CPU per request "
        f"{c['tracing_cpu_us_per_request']:.1f} us vs {c['baseline_cpu_us_per_request']:.1f} us"
    )


def cmd_trace(args: argparse.Namespace) -> int:
    params = {"id": args.export, "duration": args.duration, "sample": args.sample}
    result = call(args.control, "export-trace", params, timeout=args.duration + BASELINE_S + 30)
    if not isinstance(result, dict) or not isinstance(result.get("queues"), list):
        raise TraceError("export-trace: the daemon's answer has no queues")
    try:
        trace = chrome_trace(
            args.export,
            result["queues"],
            {"duration_s": result.get("duration_s"), "cost": result.get("cost")},
        )
        text = summary(result)
    except (TypeError, ValueError, KeyError, IndexError):
        raise TraceError("export-trace: the daemon's answer is malformed") from None
    try:
        with open(args.output, "w") as f:
            json.dump(trace, f)
    except OSError as e:
        raise TraceError(f"cannot write {args.output}: {e.strerror}") from None
    print(text, file=sys.stderr)
    return 0
