"""Thread and process names as ``ps``, ``top -H`` and ``/proc/*/comm`` show them.

Python's thread names stay inside Python; the kernel's name (15 bytes) is
set with ``prctl(PR_SET_NAME)``, so a daemon's threads and worker processes
can be told apart by export id from outside.
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["set_thread_name"]

_PR_SET_NAME = 15
#: The kernel keeps 16 bytes with the NUL.
COMM_LEN = 15

_prctl: Any
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def set_thread_name(name: str) -> None:
    """Name the calling thread (the process too, when called on its main thread)."""
    if _prctl is None:
        return
    raw = name.encode(errors="replace")[:COMM_LEN]
    _prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
