"""Adaptive interrupt coalescing for one virtqueue: signal now, or hold for company.

A backend that completes requests faster than its guest issues them (page
cache reads, say) interrupts the guest once per request: the guest kicks,
the request completes before the next one arrives, the queue goes idle and
EVENT_IDX can only say "signal". Each interrupt costs the guest an exit, its
handler and an EOI; under TCG that is a large part of a 4k read. Holding a
completion's interrupt until a few more completions join it lets one
interrupt cover them all, as NICs do with ``rx-usecs`` / ``rx-frames``.

The hold is bounded twice: a batch is released when it reaches the current
goal, or when its oldest completion has waited ``hold_ns``, whichever comes
first. The goal adapts so that a guest that waits on each request (QD1) is
not made to wait:

* it starts at 1 (signal at once) and leaves 1 only when a signal already
  covers two completions, i.e. the guest keeps several requests in flight;
* it doubles after :data:`GROW_AFTER` batches in a row that reached it,
  up to ``max_batch`` and the ceiling below;
* a hold that times out sets goal and ceiling to what did arrive, so the
  next batches are released as soon as they are that large; the ceiling
  lifts again after :data:`RETRY_AFTER` full batches.

This module is pure: the caller brings the clock and the timer.
"""

from __future__ import annotations

__all__ = ["DEFAULT_HOLD_US", "GROW_AFTER", "MAX_BATCH", "RETRY_AFTER", "Coalescer"]

#: How long ``vblk serve`` lets a completion's interrupt wait for company by default.
DEFAULT_HOLD_US = 200
#: The default largest batch one interrupt waits for.
MAX_BATCH = 16
#: Full batches in a row before the goal doubles.
GROW_AFTER = 4
#: Full batches at the ceiling before a goal that once timed out is tried again.
RETRY_AFTER = 64


class Coalescer:
    """When to interrupt the driver for completions already on the used ring.

    ``hold_ns`` 0 turns coalescing off: :meth:`completed` then always says
    signal. Counters (``held``, ``timeouts``, ``batches``) are for the logs.
    """

    def __init__(self, hold_ns: int, max_batch: int = MAX_BATCH) -> None:
        if hold_ns < 0 or max_batch < 1:
            raise ValueError(f"hold_ns {hold_ns} and max_batch {max_batch} must be >= 0 and >= 1")
        self.hold_ns = hold_ns
        self.max_batch = max_batch
        self.goal = 1
        self.ceiling = max_batch
        self.pending = 0  # completions pushed and not yet signalled
        self.deadline = 0  # monotonic ns when the pending batch must go; 0 if none
        self._streak = 0  # full batches in a row at the current goal
        self._at_ceiling = 0  # full batches at the ceiling since it was lowered
        self.held = 0  # batches that waited for company
        self.timeouts = 0  # ... and were released by the clock

    def completed(self, n: int, now: int) -> bool:
        """``n`` more completions were pushed at ``now``; True means signal now.

        False means hold them: the caller must call :meth:`expire` by
        :attr:`deadline` at the latest.
        """
        if n <= 0:
            return False
        pending = self.pending + n
        if pending >= self.goal or not self.hold_ns:
            self._full(pending)
            return True
        if not self.pending:
            self.held += 1
            self.deadline = now + self.hold_ns
        self.pending = pending
        return False

    def expire(self, now: int) -> bool:
        """Check the clock; True means the held batch is due and must be signalled now."""
        if not self.deadline or now < self.deadline:
            return False
        self.timeouts += 1
        # The guest stopped adding requests before the goal: expect no more than
        # it managed this time, until full batches show that it can.
        self.goal = self.ceiling = max(1, self.pending)
        self._streak = self._at_ceiling = 0
        self.pending = 0
        self.deadline = 0
        return True

    def flush(self) -> bool:
        """Release whatever is held (the queue stops); True if anything was."""
        held = self.pending > 0
        self.pending = 0
        self.deadline = 0
        return held

    def _full(self, pending: int) -> None:
        """A batch reached its goal: learn from it and start the next."""
        self.pending = 0
        self.deadline = 0
        if not self.hold_ns:
            return
        if self.goal >= self.ceiling and self.ceiling < self.max_batch:
            self._at_ceiling += 1
            if self._at_ceiling >= RETRY_AFTER:
                self.ceiling = min(self.max_batch, self.ceiling * 2)
                self._at_ceiling = 0
        if self.goal == 1:
            # Grow past 1 only when completions already come in company.
            if pending >= 2 and self.ceiling >= 2:
                self.goal = 2
            return
        self._streak += 1
        if self._streak >= GROW_AFTER and self.goal < self.ceiling:
            self.goal = min(self.ceiling, self.goal * 2)
            self._streak = 0
