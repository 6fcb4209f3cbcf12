"""The back-end request channel: messages from us to the frontend (BACKEND_REQ).

With protocol feature BACKEND_REQ negotiated, the frontend hands us one end
of a socket pair (SET_BACKEND_REQ_FD). vblk uses it for one message,
CONFIG_CHANGE_MSG: the device's config space changed (its capacity, after a
resize), so the frontend re-reads it with GET_CONFIG and raises a config
interrupt in the guest. With REPLY_ACK the message asks for an
acknowledgement, which QEMU sends once it has re-read the config.

The encoding and the reply check are pure (:func:`config_change_message`,
:func:`parse_ack`); :class:`BackendChannel` is the thin I/O around them,
bounded by a timeout so a frontend that stops reading costs only the caller
that asked.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading

from vblk.errors import ProtocolError
from vblk.vhost_user.defs import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    VERSION_MASK,
    BackendRequest,
)

__all__ = ["BackendChannel", "config_change_message", "parse_ack"]

_HEADER = struct.Struct("<III")
_ACK = struct.Struct("<IIIQ")
#: How long the frontend may take to acknowledge a config change.
ACK_TIMEOUT = 10.0


def config_change_message(need_reply: bool) -> bytes:
    """CONFIG_CHANGE_MSG: a header with no payload."""
    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return _HEADER.pack(BackendRequest.CONFIG_CHANGE_MSG, flags, 0)


def parse_ack(data: bytes, request: int = BackendRequest.CONFIG_CHANGE_MSG) -> int:
    """The u64 of a REPLY_ACK to ``request`` (0 is success); ProtocolError if it is not one."""
    if len(data) != _ACK.size:
        raise ProtocolError(f"backend channel: reply of {len(data)} bytes, expected {_ACK.size}")
    req, flags, size, value = _ACK.unpack(data)
    if req != request or not flags & FLAG_REPLY or flags & VERSION_MASK != FLAG_VERSION:
        raise ProtocolError(f"backend channel: unexpected reply request={req} flags={flags:#x}")
    if size != 8:
        raise ProtocolError(f"backend channel: reply payload of {size} bytes, expected 8")
    return int(value)


class BackendChannel:
    """Our end of the back-end request channel; usable from any thread (one message at a time)."""

    def __init__(self, fd: int, reply_ack: bool) -> None:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ProtocolError("SET_BACKEND_REQ_FD: the fd is not a socket")
        self._sock = socket.socket(fileno=fd)
        self._reply_ack = reply_ack
        self._lock = threading.Lock()

    def config_changed(self, timeout: float = ACK_TIMEOUT) -> None:
        """Tell the frontend to re-read the config space; wait for its ack when it sends one.

        OSError or TimeoutError if the frontend does not take the message or
        answer in time; ProtocolError if it answers nonsense or a failure.
        """
        with self._lock:
            sock = self._sock
            if sock.fileno() < 0:
                raise ProtocolError("backend channel is closed")
            sock.settimeout(timeout)
            sock.sendall(config_change_message(self._reply_ack))
            if not self._reply_ack:
                return
            data = b""
            while len(data) < _ACK.size:
                chunk = sock.recv(_ACK.size - len(data))
                if not chunk:
                    raise ProtocolError("backend channel: the frontend hung up")
                data += chunk
            if parse_ack(data) != 0:
                raise ProtocolError("backend channel: the frontend refused CONFIG_CHANGE_MSG")

    def close(self) -> None:
        # shutdown() first wakes a config_changed() blocked in recv on another thread.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            self._sock.close()
