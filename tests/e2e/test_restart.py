"""The backend dies under a running guest, comes back on the same socket, and nothing is lost.

QEMU runs with ``reconnect=1``; the guest runs fio randwrite with crc32c verify
while the host kills ``vblk serve`` (SIGKILL, or SIGTERM for a graceful
restart) and starts a new one on the same socket and image. The new process
gets the inflight region back from QEMU and resubmits what the dead one had
taken from the rings and not completed; the guest must see no I/O error.

Signals are aimed: the backend is frozen with SIGSTOP, its inflight region
read from /proc/PID/mem, and the signal sent before it thaws. After a SIGKILL
the next process must resubmit exactly the requests read; after a SIGTERM
nothing, since a graceful stop completes what is in flight. For up to half a
second the test looks for a moment with requests in flight; if none comes,
the signal goes ahead anyway.

``VBLK_SOAK=1`` (``VBLK_SOAK_SECONDS``, default 300) runs the same for
minutes, restarting every few seconds, and prints its figures.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import guest as guest_tool
import pytest
from e2e_backend import KIND, Backend, Boot, make_image, workload

from vblk.io import uring
from vblk.virtio.inflight import QueueInflight, queue_region_size

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(KIND != "vblk", reason="restarts vblk serve itself"),
]

NUM_QUEUES = 2
#: Engines the generations take in turn: out-of-order completion (threads, io_uring) and
#: in-order (sync). Three, against two signals taking turns, so each signal meets each engine.
ENGINES = ("threads", "sync", "io_uring" if uring.available() else "threads")
#: Requests a generation must have completed before it may be killed (~25 MiB of fio's).
CI_DONE_BEFORE_KILL = 700
#: How long to look for a moment with requests in flight before signalling anyway.
AIM_SECONDS = 0.5
POLL = 0.05


@dataclass
class Kill:
    sig: str
    done: int  # requests this generation completed before it was signalled
    io_active: bool  # it completed some in the last poll interval before the signal
    in_flight: int | None  # requests marked in its inflight region when signalled
    rc: int | None = None
    resubmitted: int | None = None  # what the next generation logged


@dataclass
class Run:
    result: guest_tool.GuestResult
    generations: list[Backend]
    kills: list[Kill] = field(default_factory=list)
    final_rc: int = 0

    def summary(self) -> str:
        sigs = [k.sig for k in self.kills]
        return (
            f"restarts survived: {len(self.kills)} ({sigs.count('SIGKILL')} SIGKILL, "
            f"{sigs.count('SIGTERM')} SIGTERM); in flight when signalled: "
            f"{[k.in_flight for k in self.kills]}; resubmitted after: "
            f"{sum(k.resubmitted or 0 for k in self.kills)} "
            f"{[k.resubmitted for k in self.kills]}"
        )


def region(pid: int, queue_size: int) -> list[QueueInflight] | None:
    """A copy of the backend's inflight region, one part per queue; None while unmapped.

    Read from /proc/PID/mem, so it shows what the process has recorded: exact when the
    process is frozen, a progress gauge (each part's used_idx) while it runs.
    """
    best: tuple[int, int, int] | None = None  # (memfd inode, start, end): the newest memfd
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "memfd:vblk-inflight" in line:
                    rng, _, _, _, inode = line.split()[:5]
                    start, end = (int(x, 16) for x in rng.split("-"))
                    if best is None or int(inode) > best[0]:
                        best = (int(inode), start, end)
        if best is None:
            return None
        _, start, end = best
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(start)
            data = bytearray(mem.read(end - start))
    except OSError:
        return None
    step = queue_region_size(queue_size)
    view = memoryview(data)
    return [
        QueueInflight(view[q * step : (q + 1) * step], queue_size)
        for q in range(min(NUM_QUEUES, len(data) // step))
    ]


def in_flight(pid: int, queue_size: int) -> int | None:
    """Requests marked in flight in the backend's inflight region; None if unmapped."""
    parts = region(pid, queue_size)
    return None if parts is None else sum(len(p.inflight_heads()) for p in parts)


class Progress:
    """Requests one generation has completed, from its region's used_idx fields (any engine)."""

    def __init__(self, pid: int, queue_size: int) -> None:
        self.pid, self.queue_size = pid, queue_size
        self.last: list[int] | None = None
        self.done = 0

    def poll(self) -> int:
        """Update; returns the requests completed since the previous poll."""
        parts = region(self.pid, self.queue_size)
        if parts is None:
            return 0
        now = [p.used_idx for p in parts]
        step = 0
        if self.last is not None and len(self.last) == len(now):
            step = sum((n - o) & 0xFFFF for n, o in zip(now, self.last, strict=True))
        self.last = now
        self.done += step
        return step


def stopped(pid: int) -> bool:
    """Every thread of ``pid`` has stopped (SIGSTOP took effect)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state not in ("T", "t"):
                return False
    except OSError:
        return False
    return True


class Restarter:
    """Kills and restarts ``vblk serve`` on one socket while a guest uses it."""

    def __init__(self, tmp: Path, image: Path, queue_size: int = 128) -> None:
        self.tmp, self.image, self.queue_size = tmp, image, queue_size
        self.socket = tmp / "restart.sock"
        self.generations: list[Backend] = []
        self.failed: str | None = None
        self.spawn()

    @property
    def current(self) -> Backend:
        return self.generations[-1]

    def spawn(self) -> Backend:
        n = len(self.generations)
        engine = ENGINES[n % len(ENGINES)]
        b = Backend(
            self.image,
            self.socket,
            self.tmp / f"restart-{n}.log",
            num_queues=NUM_QUEUES,
            extra=("--aio", engine),
        )
        self.generations.append(b)
        return b

    def kill(self, sig: signal.Signals, done: int, io_active: bool) -> Kill:
        """Freeze the current generation until requests are in flight, signal it, start the next.

        The signal is sent while the process is frozen, so the region read is the
        state it dies in (SIGKILL) or starts its graceful stop from (SIGTERM).
        """
        b = self.current
        pid = b.proc.pid
        count: int | None = None
        give_up = time.monotonic() + AIM_SECONDS
        while True:
            os.kill(pid, signal.SIGSTOP)
            deadline = time.monotonic() + 5
            while not stopped(pid) and time.monotonic() < deadline:
                time.sleep(0.001)
            count = in_flight(pid, self.queue_size)
            if count or time.monotonic() > give_up:
                break
            os.kill(pid, signal.SIGCONT)
            time.sleep(random.uniform(0.005, 0.03))
        # Sent while frozen: a SIGKILL dies in exactly the state just read; a SIGTERM is
        # taken by whichever thread wakes first, which vblk serve must cope with (only its
        # main thread leaves the shutdown signals unblocked).
        os.kill(pid, sig)
        os.kill(pid, signal.SIGCONT)
        kill = Kill(sig.name, done, io_active, count)
        kill.rc = b.stop(timeout=60, sig=sig)
        try:
            self.spawn()
        except RuntimeError as e:
            self.failed = str(e)
        return kill


def run_with_restarts(
    tmp: Path,
    boot: Boot,
    *,
    seconds: int,
    plan: list[signal.Signals] | None,
    done_before_kill: int,
    interval: tuple[float, float] = (0.0, 0.0),
) -> Run:
    """Boot the guest on a restartable backend and signal it per ``plan`` (None: until
    the guest is done, SIGKILL and SIGTERM in turn) once each generation has completed
    ``done_before_kill`` requests and lived a random time within ``interval`` seconds."""
    image = make_image(tmp / "restart.img", 1 << 30)
    r = Restarter(tmp, image)
    out: dict[str, guest_tool.GuestResult] = {}
    errors: list[BaseException] = []

    def guest() -> None:
        try:
            out["result"] = boot(
                r.current,
                workload("restart.sh").replace("@SECONDS@", str(seconds)),
                num_queues=NUM_QUEUES,
                smp=2,
                reconnect=1,
                timeout=seconds + 240,
                alive=lambda: r.failed is None,
            )
        except BaseException as e:  # pytest.fail raises outside Exception
            errors.append(e)

    thread = threading.Thread(target=guest, name="guest")
    thread.start()
    kills: list[Kill] = []
    try:
        born, progress = time.monotonic(), Progress(r.current.proc.pid, r.queue_size)
        wait = random.uniform(*interval)
        while thread.is_alive() and r.failed is None:
            time.sleep(POLL)
            if plan is not None and len(kills) >= len(plan):
                continue
            active = progress.poll() > 0
            if progress.done < done_before_kill or not active:
                continue
            if time.monotonic() - born < wait:
                continue
            sig = (
                plan[len(kills)]
                if plan is not None
                else (signal.SIGKILL, signal.SIGTERM)[len(kills) % 2]
            )
            kills.append(r.kill(sig, progress.done, active))
            born, progress = time.monotonic(), Progress(r.current.proc.pid, r.queue_size)
            wait = random.uniform(*interval)
    finally:
        thread.join()
        final_rc = r.current.stop()
    if errors:
        raise errors[0]
    if r.failed is not None:
        pytest.fail(f"a restarted backend did not come up: {r.failed}")
    logs = [g.log for g in r.generations]
    for i, k in enumerate(kills):
        k.resubmitted = resubmitted(logs[i + 1])
    return Run(out["result"], r.generations, kills, final_rc)


def resubmitted(log: str) -> int | None:
    """Requests a generation resubmitted at its first start of each queue (None: never started)."""
    first: dict[int, int] = {}
    for q, n in re.findall(r"queue (\d+): resubmitting (\d+) in-flight", log):
        first.setdefault(int(q), int(n))
    return sum(first.values()) if first else None


def served(log: str) -> int:
    """Requests a generation completed, from the counters its queues log when they stop."""
    return sum(int(n) for n in re.findall(r"queue \d+: (\d+) requests", log))


def check(run: Run) -> None:
    """What must hold after any run, CI or soak."""
    v = run.result.values
    out = run.result.output
    assert run.result.rc == 0, out
    assert v.get("fio_verify") == "ok", out
    assert (v.get("fio_failures"), v.get("fio_verify_errors")) == ("0", "0"), out
    assert v.get("dmesg_errors") == "0", out  # the guest saw no I/O error at all
    assert run.final_rc == 0, run.generations[-1].log[-3000:]
    first = run.generations[0].log
    assert "inflight region created" in first, first[-3000:]  # QEMU sent GET_INFLIGHT_FD
    for i, (k, gen) in enumerate(zip(run.kills, run.generations[1:], strict=True)):
        log = gen.log
        assert "Traceback" not in log, log[-3000:]
        if k.resubmitted is None:
            # Only the last generation may never have been dialled: the guest can finish
            # (nothing left in flight after a graceful stop) before QEMU's next redial.
            assert i == len(run.kills) - 1, (k, log[-3000:])
            assert k.sig == "SIGTERM" or not k.in_flight, (k, log[-3000:])
            continue
        assert "inflight region set" in log, log[-3000:]  # QEMU handed the region back
        if k.sig == "SIGTERM":
            # A graceful stop completes everything in flight (k.in_flight, often > 0)
            # before it exits, so the next process has nothing to resubmit.
            assert k.rc == 0 and k.resubmitted == 0, (k, log[-3000:])
        elif k.in_flight is not None:
            # Exactly what was marked at death, less the one push the dying process may
            # have published without clearing its mark (recovery completes that one).
            assert k.resubmitted in (k.in_flight, k.in_flight - 1), (k, log[-3000:])
    assert all("Traceback" not in g.log for g in run.generations)


def test_sigkill_and_sigterm_restarts_under_fio_verify(
    tmp_path: Path, boot: Boot, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = [signal.SIGKILL, signal.SIGKILL, signal.SIGTERM]
    run = run_with_restarts(
        tmp_path, boot, seconds=0, plan=plan, done_before_kill=CI_DONE_BEFORE_KILL
    )
    with capsys.disabled():
        print(f"\nrestart e2e: {run.summary()}")
        print(run.result.output)
    check(run)
    assert run.kills, "fio finished before the backend could be killed once"
    # Signals are only sent while requests complete, and each generation but the last
    # completed hundreds before its own; that the last one served fio too shows every
    # signal landed mid-run, not at its end.
    assert served(run.generations[-1].log) > 0, run.kills


@pytest.mark.skipif(os.environ.get("VBLK_SOAK") != "1", reason="soak test: VBLK_SOAK=1")
def test_soak_restarts(tmp_path: Path, boot: Boot, capsys: pytest.CaptureFixture[str]) -> None:
    seconds = int(os.environ.get("VBLK_SOAK_SECONDS", "300"))
    t0 = time.monotonic()
    run = run_with_restarts(
        tmp_path,
        boot,
        seconds=seconds,
        plan=None,
        done_before_kill=30,
        interval=(2.0, 5.0),
    )
    v = run.result.values
    with capsys.disabled():
        print(
            f"\nsoak ({time.monotonic() - t0:.0f}s, guest fio for {seconds}s): {run.summary()}; "
            f"fio runs {v.get('fio_runs')}, failures {v.get('fio_failures')}, "
            f"verify errors {v.get('fio_verify_errors')}, guest dmesg errors "
            f"{v.get('dmesg_errors')}"
        )
    check(run)
    assert len(run.kills) >= seconds // 10
