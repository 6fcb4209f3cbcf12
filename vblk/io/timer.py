"""A one-shot timer with a file descriptor, for poll loops that need sub-millisecond waits.

``poll()`` takes milliseconds, which is too coarse for holding an interrupt
for tens of microseconds. A Linux timerfd armed on CLOCK_MONOTONIC (the
clock of :func:`time.monotonic_ns`) becomes readable at the deadline and
sits in the same poll set as the kicks. Python 3.11 has no binding for it
(``os.timerfd_create`` arrived in 3.13), so this is a few lines of ctypes.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["Timer"]

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_create = _libc.timerfd_create
_create.argtypes = [ctypes.c_int, ctypes.c_int]
_create.restype = ctypes.c_int
_settime = _libc.timerfd_settime
_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_settime.restype = ctypes.c_int


class Timer:
    """A timerfd: :meth:`arm` at an absolute monotonic time, poll :attr:`fd`, then :meth:`clear`."""

    def __init__(self) -> None:
        fd = _create(_CLOCK_MONOTONIC, _TFD_CLOEXEC | _TFD_NONBLOCK)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_create: {os.strerror(e)}")
        self.fd = fd
        self.armed_at = 0  # the deadline armed (monotonic ns), 0 when none
        self._spec = _Itimerspec()

    def arm(self, at_ns: int) -> None:
        """Fire once at ``at_ns`` (monotonic ns; one in the past fires at once)."""
        value = self._spec.value
        value.sec, value.nsec = divmod(max(1, at_ns), 1_000_000_000)
        if _settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.addressof(self._spec), None) < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_settime: {os.strerror(e)}")
        self.armed_at = at_ns

    def clear(self) -> None:
        """Consume an expiry (the fd stops being readable); the timer is disarmed."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed_at = 0

    def close(self) -> None:
        os.close(self.fd)
