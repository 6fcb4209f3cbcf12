"""The observability surfaces against one real guest running fio on a ``vblk daemon`` export.

One boot: while the guest's fio runs, the host reads export-stats and
/metrics, takes a ``vblk trace``, runs ``vblk top`` in a pseudo-terminal and
loads the live page in headless Chromium twice (the screenshot goes to
build/observe-page.png, a CI artifact).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guest as guest_tool
import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-dev-shm-usage",
)  # fmt: skip
PARTS = ("device", "host_io", "complete", "notify")
STAGES = ("queue_wait", *PARTS, "backend")

# fio runs long enough for everything the host does meanwhile (it waits for
# fio to start, then does its part; each step is bounded).
WORKLOAD = """
fio --name=o --filename=/dev/vda --rw=randrw --bs=4k --iodepth=8 --ioengine=libaio --direct=1 \
    --size=32M --time_based --runtime=50 --eta=never --output-format=json > /tmp/f.json 2>&1 &
sleep 2
echo OBSERVE_NOW
wait $!
echo "fio_rc=$?"
"""


class Daemon:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.control = tmp / "ctl"
        self.log = tmp / "daemon.log"
        with socket_free() as port:
            self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vblk", "daemon", "--control", str(self.control),
             "--metrics", f"127.0.0.1:{self.port}", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.control.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def vblk(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "vblk", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    def stats(self) -> dict[str, Any]:
        out = self.vblk("ctl", "--control", str(self.control), "--json", "export-stats", "id=disk")
        export: dict[str, Any] = json.loads(out)["exports"][0]
        return export

    def http(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            body: bytes = r.read()
        return body.decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.vblk("ctl", "--control", str(self.control), "daemon-shutdown")
            self.proc.wait(90)
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]


class socket_free:
    """A free TCP port on 127.0.0.1 (as a context manager)."""

    def __enter__(self) -> int:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        port: int = self.s.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.s.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def _top_in_a_pty(control: Path, seconds: float) -> str:
    """What ``vblk top`` drew in a 240-column pseudo-terminal within ``seconds``."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 240, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblk", "top", "--control", str(control)],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
        env={**os.environ, "TERM": "xterm-256color"},
    )  # fmt: skip
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(master)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))


def _chromium(url: str, profile: Path, *extra: str) -> str:
    assert CHROMIUM is not None
    out = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return out.stdout


def _labels(dom: str) -> dict[str, str]:
    return dict(re.findall(r"id=\"([a-z_]+-p(?:50|99))\"[^>]*>([^<]*)<", dom))


def _observe(d: Daemon, found: dict[str, Any]) -> None:
    """The host's part, while the guest's fio runs."""
    found["stats0"] = d.stats()
    found["metrics"] = d.http("/metrics")
    trace = d.tmp / "trace.json"
    t0 = d.stats()["total"]["stages"]["backend"]["count"]
    d.vblk("trace", "--control", str(d.control), "--export", "disk", "--duration", "2",
           "--sample", "0.25", "--output", str(trace))  # fmt: skip
    t1 = d.stats()["total"]["stages"]["backend"]["count"]
    found["trace"] = json.loads(trace.read_text())
    found["timed_around_trace"] = t1 - t0
    found["top"] = _top_in_a_pty(d.control, 4)
    if CHROMIUM is not None:
        url = f"http://127.0.0.1:{d.port}/"
        budget = "--virtual-time-budget=3500"
        found["dom1"] = _chromium(url, d.tmp / "c1", budget, "--dump-dom")
        found["dom2"] = _chromium(url, d.tmp / "c2", budget, "--dump-dom")
        shot = ROOT / "build" / "observe-page.png"
        shot.parent.mkdir(exist_ok=True)
        _chromium(url, d.tmp / "c3", budget, f"--screenshot={shot}", "--window-size=800,820")
        found["shot"] = shot
    found["stats1"] = d.stats()


def test_a_guest_under_observation(guest: guest_tool.Guest, daemon: Daemon) -> None:
    img = daemon.tmp / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    daemon.vblk("ctl", "--control", str(daemon.control), "export-add", "id=disk",
                f"spec={img}", f"socket={daemon.tmp / 'disk.sock'}", "num_queues=2")  # fmt: skip
    found: dict[str, Any] = {}
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def work() -> None:
        try:
            _observe(daemon, found)
        except BaseException as e:
            errors.append(e)

    def on_line(line: str) -> None:
        if "OBSERVE_NOW" in line and not threads:
            threads.append(threading.Thread(target=work))
            threads[0].start()
        if line.startswith("fio_rc=") and "stats1" not in found:
            found["fio_ended_first"] = True

    res = guest_tool.run_guest(
        daemon.tmp / "disk.sock", WORKLOAD, guest=guest, smp=2, num_queues=2,
        alive=lambda: daemon.proc.poll() is None, on_line=on_line, timeout=240,
    )  # fmt: skip
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert res.rc == 0 and "fio_rc=0" in res.output, res.output[-3000:]
    assert "fio_ended_first" not in found, "fio ended before the host had looked"

    # export-stats: every stage has counts in every queue; parts add up to backend.
    s1 = found["stats1"]
    assert len(s1["queues"]) == 2
    for q in [*s1["queues"], s1["total"]]:
        st = q["stages"]
        assert all(st[s]["count"] > 0 for s in STAGES), {s: st[s]["count"] for s in STAGES}
        assert sum(st[s]["sum_ns"] for s in PARTS) == st["backend"]["sum_ns"]
        assert all(st[s]["count"] == st["backend"]["count"] for s in STAGES)
    # /metrics: the same histograms.
    for stage in STAGES:
        m = re.search(
            rf'vblk_stage_seconds_count{{export="disk",queue="0",stage="{stage}"}} ([0-9.e+]+)',
            found["metrics"],
        )
        assert m and float(m.group(1)) > 0, stage

    # The trace: a slice per stage of each request, tiling backend; as many requests as
    # the stats timed over the same window.
    trace = found["trace"]
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            assert {"type", "offset", "length"} <= set(e["args"])
    requests = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "backend"]
    by_name = {
        n: [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == n] for n in STAGES
    }
    assert all(len(v) == len(requests) > 0 for v in by_name.values())
    for i, be in enumerate(requests):
        parts = sum(by_name[p][i]["dur"] for p in PARTS)
        assert abs(parts - be["dur"]) < 0.01, (parts, be)  # µs, rounded to ns
    assert any(e["ph"] == "i" and e["name"] == "irq" for e in trace["traceEvents"])
    cost = trace["otherData"]["cost"]
    assert trace["otherData"]["sample_every"] == 4
    assert cost["requests_traced"] == len(requests)
    assert abs(cost["timed_during"] - len(requests)) <= 4
    # The window around the call (its baseline second included) timed at least as many.
    assert found["timed_around_trace"] >= len(requests)

    # vblk top showed the export with non-zero IOPS.
    rows = [ln for ln in found["top"].splitlines() if re.match(r"\s*[│|]\s*disk\s", ln)]
    assert rows, found["top"][-2000:]
    iops = [float(c) for ln in rows for c in re.split(r"\s*[│|]\s*", ln.strip(" │|"))[2:4] if c]
    assert max(iops) > 0, rows

    # The page in Chromium: its latencies moved between two loads.
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium for the page check")
    first, second = _labels(found["dom1"]), _labels(found["dom2"])
    assert first and first.keys() == second.keys()
    assert all(v.startswith(("p50 ", "p99 ")) for v in first.values())
    assert first != second, first
    assert found["shot"].stat().st_size > 10_000
