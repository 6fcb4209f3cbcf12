"""``vblk bench`` and ``vblk info`` as a user runs them, plus the latency histogram."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import stop

from vblk.bench import Histogram, bucket_of, bucket_value

IMAGE_SIZE = 8 << 20


def vblk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vblk", *args], capture_output=True, text=True, timeout=timeout
    )


def _wait_for(sock: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not start: {proc.communicate()[1]!r}")
        time.sleep(0.02)


def _image(tmp: Path, name: str) -> Path:
    img = tmp / name
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return img


@pytest.fixture(params=["vblk", "qsd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The socket of a 2-queue backend: our ``vblk serve`` or qemu-storage-daemon."""
    sock = tmp_path / "b.sock"
    img = _image(tmp_path, "b.img")
    if request.param == "vblk":
        cmd = [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(sock),
               "--num-queues", "2", "--log-level", "warning"]  # fmt: skip
    else:
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            if os.environ.get("CI") == "true":
                pytest.fail("qemu-storage-daemon is not installed (required in CI)")
            pytest.skip("qemu-storage-daemon is not installed")
        cmd = [qsd, "--blockdev", f"driver=file,node-name=f0,filename={img}",
               "--blockdev", "driver=raw,node-name=d0,file=f0",
               "--export", "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
               f"addr.path={sock},writable=on,num-queues=2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(sock, proc, request.param)
    try:
        yield str(sock)
    finally:
        stop(proc)


def _check_result(r: dict[str, Any]) -> None:
    assert r["iops"] > 0 and r["ios"] > 0 and r["errors"] == 0
    lat = r["lat_us"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    assert r["bytes"] == r["ios"] * r["bs"]


@pytest.mark.parametrize(
    "args",
    [
        ["--rw", "randread", "--queues", "2"],
        ["--rw", "randrw", "--rwmixread", "70", "--bs", "8k", "--iodepth", "8"],
    ],
    ids=["randread-2q", "randrw"],
)
def test_bench_json(backend: str, args: list[str]) -> None:
    p = vblk("bench", "--socket", backend, "--runtime", "1.5", "--json", *args)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    _check_result(r)
    assert 1.4 < r["elapsed_s"] < 10
    if "randrw" in args:
        assert r["reads"] > r["writes"] > 0
    else:
        assert r["queues"] == 2 and all(x > 0 for x in r["per_queue_iops"])
        assert "\r" not in p.stderr  # no progress line unless asked or on a tty


def test_bench_one_pass_and_progress(backend: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "vblk", "bench", "--socket", backend, "--rw", "write",
         "--runtime", "0", "--size", "2M", "--offset", "1M", "--bs", "64k", "--progress"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, err
    assert "IOPS" in out and "errors 0" in out and "(32 I/Os" in out
    assert "\r" in err and "MB/s" in err  # a carriage-return progress line


def test_info_json(backend: str) -> None:
    p = vblk("info", "--socket", backend, "--json", "--timeout", "10")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["capacity"] == IMAGE_SIZE
    assert info["sectors"] == info["config"]["capacity"] == IMAGE_SIZE // 512
    assert info["max_queues"] == 2
    assert "VERSION_1" in info["features"] and "FLUSH" in info["features"]
    assert "CONFIG" in info["protocol_features"]
    assert isinstance(info["serial"], str)
    text = vblk("info", "--socket", backend)
    assert text.returncode == 0 and "capacity:" in text.stdout and "8 MiB" in text.stdout


def test_bad_arguments_one_line(tmp_path: Path) -> None:
    p = vblk("bench", "--socket", str(tmp_path / "none.sock"), "--runtime", "1")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("vblk: error:") and "cannot connect" in p.stderr
    p = vblk("bench", "--socket", str(tmp_path / "none.sock"), "--bs", "1000")
    assert p.returncode == 1 and "--bs 1000" in p.stderr
    p = vblk("info", "--socket", str(tmp_path / "none.sock"))
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1


def test_histogram_buckets_are_monotonic_and_tight() -> None:
    last = -1
    for ns in sorted({*range(200), *(int(1.07**k) for k in range(60, 420))}):
        b = bucket_of(ns)
        assert b >= last
        last = b
        mid = bucket_value(b)
        assert abs(mid - ns) <= max(1.0, ns / 32)


def test_histogram_percentiles() -> None:
    h = Histogram()
    rng = random.Random(3)
    samples = sorted(int(rng.lognormvariate(11, 0.6)) for _ in range(20000))
    for s in samples:
        h.counts[bucket_of(s)] += 1
    h.total, h.sum, h.min, h.max = len(samples), sum(samples), samples[0], samples[-1]
    for p in (50, 99, 99.9):
        exact = samples[int(len(samples) * p / 100) - 1]
        assert abs(h.percentile(p) - exact) <= exact / 16
    other = Histogram()
    other.merge(h)
    assert other.percentile(99) == h.percentile(99) and other.total == h.total
    assert Histogram().percentile(50) == 0.0
