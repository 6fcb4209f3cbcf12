"""Tests of ``vblk trace`` against a control socket peer that answers export-trace."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from vblk.stats.stages import KIND_WRITE, QueueStages


def _answer() -> dict[str, Any]:
    st = QueueStages(4, sample_every=1)
    st.start_trace(1, 100)
    st.woke(1000)
    st.pass_started(1000)
    st.popped(1, 2000)
    st.submitted(1, 3000, KIND_WRITE, 8192, 4096)
    st.completed(1, 9000)
    st.pushed(1, 9500)
    st.notified(12000)
    return {
        "duration_s": 1.0,
        "sample_every": 1,
        "queues": [st.stop_trace(0)],
        "cost": {
            "requests_traced": 1,
            "dropped": 0,
            "requests_during": 1,
            "timed_during": 1,
            "baseline_iops": 1.0,
            "tracing_iops": 1.0,
            "baseline_cpu_us_per_request": 5.0,
            "tracing_cpu_us_per_request": 6.0,
        },
    }


def _daemon(path: Path, result: Any) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            req = json.loads(conn.makefile("rb").readline())
            assert req["method"] == "export-trace"
            assert req["params"] == {"id": "d0", "duration": 1.0, "sample": 0.5}
            conn.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "result": result}).encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def _vblk_trace(sock: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vblk",
            "trace",
            "--control",
            str(sock),
            "--export",
            "d0",
            "--duration",
            "1",
            "--sample",
            "0.5",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_writes_chrome_trace_and_reports_cost(tmp_path: Path) -> None:
    t = _daemon(tmp_path / "c.sock", _answer())
    out = tmp_path / "t.json"
    proc = _vblk_trace(tmp_path / "c.sock", out)
    t.join(5)
    assert proc.returncode == 0, proc.stderr
    assert "traced 1 requests" in proc.stderr and "6.0 us vs 5.0 us" in proc.stderr
    trace = json.loads(out.read_text())
    names = sorted(e["name"] for e in trace["traceEvents"] if e["ph"] == "X")
    assert names == sorted(["queue_wait", "backend", "device", "host_io", "complete", "notify"])
    assert trace["otherData"]["requests"] == 1


def test_malformed_answer_is_one_line(tmp_path: Path) -> None:
    t = _daemon(tmp_path / "c.sock", {"queues": [{"queue": 0, "requests": [[1, 2]]}]})
    proc = _vblk_trace(tmp_path / "c.sock", tmp_path / "t.json")
    t.join(5)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "vblk: error: export-trace: the daemon's answer is malformed"
    ]


def test_bad_sample_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vblk",
            "trace",
            "--control",
            "x",
            "--export",
            "d",
            "--output",
            "o",
            "--sample",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "fraction" in proc.stderr
