"""``vblk daemon`` as a real process: control methods, hostile clients, metrics, crash isolation.

I/O goes through vblk.client (no guest); the guests are in tests/e2e/test_daemon_guests.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import stop
from vblk import client
from vblk.control import jsonrpc as rpc
from vblk.control.methods import METHODS

MiB = 1 << 20
#: The daemon's half-message timeout in these tests (10 s by default).
MESSAGE_TIMEOUT = 2


class Daemon:
    def __init__(self, tmp: Path, proc: subprocess.Popen[bytes], control: Path, port: int) -> None:
        self.tmp, self.proc, self.control, self.port = tmp, proc, control, port

    def line(self, obj: Any) -> dict[str, Any]:
        return self.raw((json.dumps(obj) + "\n").encode())

    def raw(self, data: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.control))
            s.sendall(data)
            return json.loads(_read_line(s))

    def call(self, method: str, **params: Any) -> Any:
        ans = self.line({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        if "error" in ans:
            raise rpc.RpcError(ans["error"]["code"], ans["error"]["message"])
        return ans["result"]

    def error(self, method: str, **params: Any) -> tuple[int, str]:
        with pytest.raises(rpc.RpcError) as e:
            self.call(method, **params)
        return e.value.code, e.value.message

    def add(self, name: str, size: int = 16 * MiB, **params: Any) -> dict[str, Any]:
        img = self.tmp / f"{name}.img"
        if not img.exists():
            with open(img, "wb") as f:
                f.truncate(size)
        result: dict[str, Any] = self.call(
            "export-add", id=name, spec=str(img), socket=str(self.tmp / f"{name}.sock"), **params
        )
        return result

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def _read_line(s: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    control = tmp_path / "ctl"
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblk", "daemon", "--control", str(control),
         "--metrics", f"127.0.0.1:{port}", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "wb"),
        env=os.environ | {"VBLK_CONTROL_MESSAGE_TIMEOUT": str(MESSAGE_TIMEOUT)},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not control.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "daemon.log"
        ).read_text()
        time.sleep(0.05)
    d = Daemon(tmp_path, proc, control, port)
    try:
        yield d
    finally:
        if proc.poll() is None:
            try:
                d.call("daemon-shutdown")
                proc.wait(60)
            except Exception:
                stop(proc)
        assert not control.exists()


def _io(sock: Path, n: int = 64) -> None:
    with client.connect(str(sock)) as dev:
        pattern = os.urandom(4096)
        for i in range(n):
            dev.write(i * 4096, pattern)
            assert dev.read(i * 4096, 4096) == pattern


def test_export_life_cycle_and_errors(daemon: Daemon) -> None:
    a = daemon.add("a", num_queues=2)
    assert a["state"] == "running" and a["size"] == 16 * MiB
    assert os.stat(daemon.tmp / "a.sock").st_mode & 0o777 == 0o600
    assert os.stat(daemon.control).st_mode & 0o777 == 0o600
    assert daemon.error("export-add", id="a", spec="x", socket="y")[0] == rpc.EXPORT_EXISTS
    code, msg = daemon.error("export-add", id="b", spec="x", socket=str(daemon.tmp / "a.sock"))
    assert code == rpc.SOCKET_IN_USE and "in use" in msg
    code, msg = daemon.error(
        "export-add", id="b", spec=str(daemon.tmp / "missing.img"), socket=str(daemon.tmp / "b")
    )
    assert code == rpc.STORAGE_ERROR and "no such image" in msg
    assert not (daemon.tmp / "b").exists()  # a failed add leaves no socket behind
    assert daemon.error("export-remove", id="zz")[0] == rpc.EXPORT_NOT_FOUND
    _io(daemon.tmp / "a.sock")
    stats = daemon.call("export-stats", id="a")["exports"][0]
    assert stats["total"]["write_ops"] == 64 and stats["total"]["read_ops"] >= 64
    assert stats["total"]["write_bytes"] == 64 * 4096
    # Resize: grow, refuse a shrink, shrink with force.
    r = daemon.call("export-resize", id="a", size=32 * MiB)
    assert r["size"] == 32 * MiB and os.path.getsize(daemon.tmp / "a.img") == 32 * MiB
    code, msg = daemon.error("export-resize", id="a", size=8 * MiB)
    assert code == rpc.RESIZE_REFUSED and "force" in msg
    daemon.call("export-resize", id="a", size=8 * MiB, force=True)
    assert os.path.getsize(daemon.tmp / "a.img") == 8 * MiB
    with client.connect(str(daemon.tmp / "a.sock")) as dev:
        assert dev.capacity == 8 * MiB  # bytes
    # Remove, then add the same id again.
    daemon.call("export-remove", id="a")
    assert not (daemon.tmp / "a.sock").exists()
    assert daemon.call("export-list") == []
    daemon.add("a")
    _io(daemon.tmp / "a.sock", 4)


GROWABLE = """
class Disk:
    def __init__(self, size="4194304"):
        self.data = bytearray(int(size))

    def size(self):
        return len(self.data)

    def pread(self, offset, buf):
        buf[:] = self.data[offset : offset + len(buf)]

    def pwrite(self, offset, buf):
        self.data[offset : offset + len(buf)] = buf

    def resize(self, size):
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
"""


def test_specs_opts_and_resize_go_through_the_storage(daemon: Daemon) -> None:
    ramdisk = "python:" + str(Path(__file__).parent.parent / "examples" / "ramdisk.py") + ":RamDisk"
    sock = str(daemon.tmp / "r.sock")
    r = daemon.call("export-add", id="r", spec=ramdisk, socket=sock, opts={"size": "8M"})
    assert r["size"] == 8 * MiB
    _io(daemon.tmp / "r.sock", 8)
    code, msg = daemon.error("export-resize", id="r", size=16 * MiB)
    assert code == rpc.RESIZE_REFUSED and "no resize()" in msg
    code, msg = daemon.error(
        "export-add", id="x", spec=ramdisk, socket=str(daemon.tmp / "x"), opts={"bogus": 1}
    )
    assert code == rpc.STORAGE_ERROR and "bogus" in msg and "\n" not in msg
    code, msg = daemon.error(
        "export-add", id="x", spec=str(daemon.tmp / "r.sock"), socket=str(daemon.tmp / "x"),
        direct=True, aio="sync",
    )  # fmt: skip
    assert code == rpc.STORAGE_ERROR and "\n" not in msg
    # A plugin with resize() grows (opts numbers arrive as --opt text would), the client sees it.
    (daemon.tmp / "grow.py").write_text(GROWABLE)
    spec = f"python:{daemon.tmp / 'grow.py'}:Disk"
    g = daemon.call(
        "export-add", id="g", spec=spec, socket=str(daemon.tmp / "g.sock"), opts={"size": 4 * MiB}
    )
    assert g["size"] == 4 * MiB
    assert daemon.call("export-resize", id="g", size=12 * MiB)["size"] == 12 * MiB
    with client.connect(str(daemon.tmp / "g.sock")) as dev:
        assert dev.capacity == 12 * MiB
        dev.write(12 * MiB - 4096, b"z" * 4096)
        assert dev.read(12 * MiB - 4096, 4096) == b"z" * 4096


def test_hostile_control_clients(daemon: Daemon) -> None:
    daemon.add("a")
    # Garbage lines each get a parse or request error; the connection stays usable.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(daemon.control))
        f = s.makefile("rwb")
        for junk in (b"\x00\xff garbage", b"[1,2]", b"{}", b'{"jsonrpc":"2.0","method":7,"id":1}'):
            f.write(junk + b"\n")
            f.flush()
            ans = json.loads(f.readline())
            assert ans["error"]["code"] in (rpc.PARSE_ERROR, rpc.INVALID_REQUEST)
        # Every method with every wrong parameter type, on one connection.
        wrong: list[Any] = ["s", 1, 1.5, True, None, [1], {"a": 1}]
        answered = 0
        for method, schema in METHODS.items():
            if method == "daemon-shutdown":
                continue
            for name in schema:
                for value in wrong:
                    req = {"jsonrpc": "2.0", "id": answered, "method": method,
                           "params": {"id": "nope", name: value}}  # fmt: skip
                    f.write(json.dumps(req).encode() + b"\n")
                    f.flush()
                    ans = json.loads(f.readline())
                    assert ans["id"] == answered
                    assert "error" in ans or method in ("export-list", "export-stats")
                    answered += 1
        f.write(b'{"jsonrpc":"2.0","id":"x","method":"export-list"}\n')
        f.flush()
        assert json.loads(f.readline())["result"][0]["id"] == "a"
    # A huge line is refused and the client disconnected.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(daemon.control))
        try:
            s.sendall(b"x" * (2 * MiB))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert json.loads(_read_line(s))["error"]["code"] == rpc.PARSE_ERROR
    # 100 connections at once, each with half a message left hanging, while others are served.
    hanging = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(daemon.control))
        s.sendall(b'{"jsonrpc":"2.0","me')
        hanging.append(s)
    results: list[Any] = []

    def lister() -> None:
        results.append(daemon.call("export-list"))

    threads = [threading.Thread(target=lister) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 10
    _io(daemon.tmp / "a.sock", 4)
    # The half messages are dropped after the message timeout.
    hanging[0].settimeout(30)
    assert hanging[0].recv(10) == b""
    for s in hanging:
        s.close()
    assert daemon.proc.poll() is None
    # A notification (no id) gets no answer; the connection goes on.
    ans = daemon.raw(
        b'{"jsonrpc":"2.0","method":"export-list"}\n'
        b'{"jsonrpc":"2.0","id":2,"method":"export-list"}\n'
    )
    assert ans["id"] == 2


def test_metrics_grow_with_io(daemon: Daemon) -> None:
    daemon.add("a", num_queues=2)
    key = ("vblk_write_ops_total", (("export", "a"), ("queue", "0")))
    before = daemon.metrics()
    assert before.get(key, 0) == 0
    assert before[("vblk_export_restarts_total", (("export", "a"),))] == 0
    _io(daemon.tmp / "a.sock", 32)
    after = daemon.metrics()
    assert after[key] == 32
    assert after[("vblk_write_bytes_total", (("export", "a"), ("queue", "0")))] == 32 * 4096
    assert after[("vblk_export_size_bytes", (("export", "a"),))] == 16 * MiB


def test_qos_limits_then_lifts(daemon: Daemon) -> None:
    daemon.add("a")
    sock = str(daemon.tmp / "a.sock")
    daemon.call("export-set-qos", id="a", iops=300)
    assert daemon.call("export-list")[0]["qos"]["iops"] == 300

    def iops() -> float:
        out = subprocess.run(
            [sys.executable, "-m", "vblk", "bench", "--socket", sock, "--runtime", "3",
             "--iodepth", "16", "--json"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        return float(json.loads(out.stdout)["iops"])

    limited = iops()
    assert 300 * 0.8 < limited < 300 * 1.2 + 30 / 3  # the rate plus the 0.1 s bucket
    daemon.call("export-set-qos", id="a", iops=0)
    assert iops() > limited * 3


HOSTILE_FRONTEND = """
import os, sys, time
from vblk import client
dev = client.connect(sys.argv[1])
os.ftruncate(dev._memfd, 0)   # the memfd allows no seals: the backend's mapping now faults
os.eventfd_write(dev.queues[0].kick_fd, 1)
time.sleep(5)
"""


def test_a_frontend_that_shrinks_its_memory_kills_only_its_own_export(daemon: Daemon) -> None:
    daemon.add("victim")
    daemon.add("other")
    pid = daemon.call("export-list")[0]["pid"]
    stop_other = threading.Event()
    errors: list[BaseException] = []

    def keep_busy() -> None:
        try:
            while not stop_other.is_set():
                _io(daemon.tmp / "other.sock", 8)
        except BaseException as e:
            errors.append(e)

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        subprocess.run(
            [sys.executable, "-c", HOSTILE_FRONTEND, str(daemon.tmp / "victim.sock")],
            timeout=60,
            capture_output=True,
        )
        deadline = time.monotonic() + 30
        while True:
            victim = daemon.call("export-list")[0]
            if victim["restarts"] == 1 and victim["state"] == "running":
                break
            assert time.monotonic() < deadline, victim
            time.sleep(0.2)
        assert victim["pid"] != pid
    finally:
        stop_other.set()
        busy.join(60)
    assert not errors, errors
    assert daemon.call("export-list")[1]["restarts"] == 0
    _io(daemon.tmp / "victim.sock", 8)
    m = daemon.metrics()
    assert m[("vblk_export_restarts_total", (("export", "victim"),))] == 1


def test_stage_stats_and_a_trace_of_a_live_export(daemon: Daemon) -> None:
    """export-stats carries the stage histograms; export-trace records the same requests."""
    daemon.add("t", num_queues=1)
    assert daemon.error("export-trace", id="t", duration=1)[0] == rpc.EXPORT_FAILED  # no queue
    done = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            with client.connect(str(daemon.tmp / "t.sock")) as dev:
                pattern = os.urandom(4096)
                i = 0
                while not done.is_set():
                    dev.write(i % 256 * 4096, pattern)
                    i += 1
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=load)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not daemon.call("export-stats", id="t")["exports"][0]["queues"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        result = daemon.call("export-trace", id="t", duration=1.5, sample=1)
    finally:
        done.set()
        t.join(30)
    assert not errors, errors
    (q,) = result["queues"]
    assert q["queue"] == 0 and result["sample_every"] == 1
    requests = q["requests"]
    cost = result["cost"]
    assert cost["requests_traced"] == len(requests) > 0
    # Every request timed while the trace ran is in it (the queue's own counts).
    assert abs(cost["timed_during"] - len(requests)) <= 2
    for wake, pop, sub, done_, push, irq, kind, offset, length in requests:
        assert wake <= pop <= sub <= done_ <= push <= irq
        assert kind == 1 and length == 4096 and offset % 4096 == 0
    total = daemon.call("export-stats", id="t")["exports"][0]["total"]
    stages = total["stages"]
    assert stages["backend"]["count"] >= len(requests)
    parts = sum(stages[s]["sum_ns"] for s in ("device", "host_io", "complete", "notify"))
    assert parts == stages["backend"]["sum_ns"]
    metrics = daemon.metrics()
    key = ("vblk_stage_seconds_count", (("export", "t"), ("queue", "0"), ("stage", "host_io")))
    assert metrics[key] == stages["host_io"]["count"]
    svg = daemon.tmp / "path.svg"
    out = subprocess.run(
        [sys.executable, "-m", "vblk", "ctl", "--control", str(daemon.control), "export-stats",
         "id=t", "--svg", str(svg)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "p99.9" in out.stdout and "host_io" in out.stdout
    assert svg.read_text().startswith("<svg") and "vblk export t" in svg.read_text()


def test_a_frontend_that_stops_reading_replies_does_not_stall_the_data_path(
    daemon: Daemon,
) -> None:
    daemon.add("a")
    flood_blocked = threading.Event()
    with client.connect(str(daemon.tmp / "a.sock"), timeout=30) as dev:
        raw = dev._sock.dup()  # the frontend's control socket, to misuse
        raw.settimeout(3)

        def flood() -> None:
            # GET_FEATURES (1), version flag, no payload: each asks for a reply never read.
            msg = (1).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(4)
            try:
                for _ in range(1 << 20):
                    raw.sendall(msg * 64)
            except TimeoutError:
                flood_blocked.set()  # the backend stopped reading: its replies are stuck
            except OSError:
                pass

        flooder = threading.Thread(target=flood)
        # The client treats bytes on its control socket as a reply under way while its
        # control lock is held; they are the replies this test refuses to read.
        with dev._ctl_lock:
            flooder.start()
            assert flood_blocked.wait(60), "the backend kept reading without replying"
            t0 = time.monotonic()
            pattern = os.urandom(4096)
            for i in range(64):
                dev.write(i * 4096, pattern)
                assert dev.read(i * 4096, 4096) == pattern
            assert time.monotonic() - t0 < 20
            stats = daemon.call("export-stats", id="a")["exports"][0]
            assert stats["total"]["write_ops"] >= 64
        flooder.join(30)
        raw.close()
        dev._sock.shutdown(socket.SHUT_RDWR)  # hang up; close() has nothing left to say
    # Once that frontend is gone, the export takes the next one.
    deadline = time.monotonic() + 30
    while True:
        try:
            _io(daemon.tmp / "a.sock", 4)
            break
        except (OSError, client.VblkError) as e:
            assert time.monotonic() < deadline, e
            time.sleep(0.5)


def test_a_late_answer_is_never_taken_for_the_next_commands() -> None:
    """A worker answer that came after its command timed out is dropped, not mismatched."""
    import multiprocessing

    from vblk.daemon import Daemon as InProcess
    from vblk.daemon import _Handle
    from vblk.export import ExportConfig

    d = InProcess(None)
    ours, worker = multiprocessing.Pipe()
    listener = socket.socket(socket.AF_UNIX)
    handle = _Handle(ExportConfig("e", "x", "x.sock"), listener, (0, 0), conn=ours)
    handle.state = "running"
    try:
        with pytest.raises(rpc.RpcError, match="did not answer"):
            d._call(handle, ("stats",), timeout=0.05)
        assert worker.recv() == ("stats",)
        worker.send(("ok", "stats, late"))
        worker.send(("ok", "resized"))
        assert d._call(handle, ("resize", 512, False), timeout=5) == "resized"
        assert worker.recv() == ("resize", 512, False)
        worker.send(("ok", "next"))
        assert d._call(handle, ("qos", {}), timeout=5) == "next"
    finally:
        listener.close()
        ours.close()
        worker.close()
