"""The queue worker: one thread that drains one virtqueue, with a choice of I/O engine.

It joins the sans-IO pieces at run time: the ring (:mod:`vblk.virtio.queue`)
yields chains, the device model (:mod:`vblk.blk.device`) checks and executes
them, and completions go back onto the used ring with an interrupt when
EVENT_IDX asks for one.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import cast

from vblk.blk.device import BlockDevice, DataRequest, Stats
from vblk.io.engines import ENGINES, make_engine
from vblk.vhost_user.backend import Vring

log = logging.getLogger(__name__)

#: Completions signalled to the driver at least this often within one long batch.
NOTIFY_BATCH = 16
#: How long a stopping queue may take to finish its in-flight requests.
STOP_TIMEOUT = 60.0
#: Adaptive polling starts at this window and doubles while it pays off (as QEMU's IOThreads).
POLL_START_NS = 4_000

__all__ = ["ENGINES", "QueueWorker"]


class QueueWorker:
    """Drains one virtqueue on its own thread whenever the driver kicks it.

    The I/O engine (:mod:`vblk.io.engines`) decides how one queue's reads and
    writes overlap; everything else (pop, checks, the used ring, notification
    suppression) stays on the queue thread, which reaps every completion
    itself, so the used ring has one writer.

    ``poll_us`` > 0 turns on adaptive polling: before sleeping, the thread
    watches the avail ring (and the engine) for up to that long, with guest
    kicks suppressed. The window grows while events arrive within it and
    collapses when they do not, so an idle queue costs no CPU.
    """

    def __init__(
        self,
        vring: Vring,
        device: BlockDevice,
        engine: str = "sync",
        io_threads: int = 4,
        poll_us: int = 0,
    ) -> None:
        assert vring.queue is not None
        self.vring = vring
        self.queue = vring.queue
        self.device = device
        self.engine = make_engine(
            engine,
            queue_size=self.queue.size,
            io_threads=io_threads,
            direct=device.image.direct,
            label=f"vblk-queue{vring.index}-io",
        )
        self._stopping = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.poll_max_ns = max(0, poll_us) * 1000
        self.poll_ns = 0
        # What the driver asked of us and what we asked of it: with EVENT_IDX
        # both kicks and interrupts stay well below the request count.
        self.kicks = 0
        self.interrupts = 0
        self.batches = 0
        self.polled = 0  # wake-ups that polling saved
        self.stats = Stats()
        self.thread = threading.Thread(
            target=self._run, name=f"vblk-queue{vring.index}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the requests in hand, signal their completion, and end the thread."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self.thread.join(STOP_TIMEOUT)
        if self.thread.is_alive():
            log.error("queue %d did not stop within %.0fs", self.vring.index, STOP_TIMEOUT)
            return
        self.engine.close()
        os.close(self._wake)
        st = self.stats
        log.info(
            "queue %d: %d requests in %d batches, %d kicks, %d interrupts%s; "
            "%d MiB read, %d MiB written, %d flushes, %d discards, %d write-zeroes, "
            "%d IOERR, %d UNSUPP",
            self.vring.index,
            st.requests,
            self.batches,
            self.kicks,
            self.interrupts,
            f", {self.polled} found by polling" if self.poll_max_ns else "",
            st.read_bytes >> 20,
            st.write_bytes >> 20,
            st.flushes,
            st.discards,
            st.write_zeroes,
            st.ioerr,
            st.unsupp,
        )

    def _run(self) -> None:
        kick = self.vring.kick_fd
        poller = select.poll()
        poller.register(kick, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        engine = self.engine
        engine_fd = engine.fd
        if engine_fd is not None:
            poller.register(engine_fd, select.POLLIN)
        now = time.monotonic_ns
        try:
            # Requests may already be waiting (a ring resumed after a restart).
            self._drain()
            while not self._stopping and self.queue.broken is None:
                t0 = now()
                if self.poll_ns and self._poll(t0 + self.poll_ns):
                    self.polled += 1
                    self._drain()
                    continue
                for fd, ev in poller.poll():
                    if fd == kick:
                        if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                            log.warning("queue %d: kick fd closed", self.vring.index)
                            return
                        self.kicks += os.eventfd_read(kick)
                    elif fd == engine_fd:
                        engine.clear_signal()
                if self.poll_max_ns:
                    self._adapt(now() - t0)
                if not self._stopping:
                    self._drain()  # reaps the engine too, whatever woke us
        except Exception:
            log.exception("queue %d: worker failed; queue stopped", self.vring.index)
            self.queue.mark_broken("worker failed")
            self.vring.signal_err()
        finally:
            self._finish_inflight(poller)

    def _poll(self, deadline: int) -> bool:
        """Spin until the driver adds work or the engine completes some, or ``deadline``.

        Kicks are off meanwhile (the guest saves its exits); True means there
        is work, False that the window passed and kicks are back on.
        """
        q = self.queue
        ready = self.engine.ready
        now = time.monotonic_ns
        q.disable_notifications()
        while now() < deadline:
            if q.avail_pending() or ready() or self._stopping:
                return True
        return q.enable_notifications()

    def _adapt(self, block_ns: int) -> None:
        """Grow the polling window when events come soon after it, drop it when they do not."""
        if block_ns <= self.poll_ns:
            return
        if block_ns > self.poll_max_ns:
            self.poll_ns = 0
        elif self.poll_ns < self.poll_max_ns:
            self.poll_ns = min(self.poll_max_ns, max(POLL_START_NS, self.poll_ns * 2))

    def _finish_inflight(self, poller: select.poll) -> None:
        """Stopping: every request handed to the engine completes and is signalled first."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.engine.inflight and time.monotonic() < deadline:
            poller.poll(100)
            self.engine.clear_signal()
            self._complete()
        if self.engine.inflight:
            log.error(
                "queue %d: %d requests never completed", self.vring.index, self.engine.inflight
            )

    def _complete(self) -> None:
        """Reap the engine: status bytes, used ring, and an interrupt if the driver wants one."""
        q = self.queue
        finish = self.device.finish
        stats = self.stats
        for token, res in self.engine.reap():
            data = cast(DataRequest, token)  # the only tokens _drain submits; no check per I/O
            q.push(data.head, finish(data, res, stats))
        if q.should_notify():
            self.interrupts += 1
            self.vring.signal_call()

    def _drain(self) -> None:
        """Pop until the ring is empty with kicks re-enabled, or the queue stops."""
        q = self.queue
        start = self.device.start
        engine = self.engine
        submit = engine.submit
        image_fd = self.device.image.fd
        stats = self.stats
        self.batches += 1
        while True:
            q.disable_notifications()
            n = 0
            while not self._stopping:
                chain = q.pop()
                if chain is None:
                    break
                started = start(chain, stats)
                if isinstance(started, DataRequest):
                    submit(image_fd, started.write, started.bufs, started.offset, started)
                elif started is None:
                    q.mark_broken(f"request {chain.head} has no status byte: {chain.error}")
                    break
                else:
                    q.push(chain.head, started)
                n += 1
                if n % NOTIFY_BATCH == 0:
                    # A long batch: let the first requests start and finish early.
                    engine.commit()
                    self._complete()
            engine.commit()
            self._complete()
            if q.broken is not None:
                log.error("queue %d is broken: %s", self.vring.index, q.broken)
                self.vring.signal_err()
                return
            if self._stopping or not q.enable_notifications():
                return
