"""The back-end request channel: CONFIG_CHANGE_MSG, its ack, a frontend that never acks."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from vblk.errors import ProtocolError
from vblk.vhost_user.backend_channel import BackendChannel, config_change_message, parse_ack


def test_config_change_message_bytes() -> None:
    assert config_change_message(True) == struct.pack("<III", 2, 0x1 | 0x8, 0)
    assert config_change_message(False) == struct.pack("<III", 2, 0x1, 0)


def test_parse_ack() -> None:
    assert parse_ack(struct.pack("<IIIQ", 2, 0x5, 8, 0)) == 0
    assert parse_ack(struct.pack("<IIIQ", 2, 0x5, 8, 1)) == 1
    for bad in (
        struct.pack("<IIIQ", 3, 0x5, 8, 0),  # another request
        struct.pack("<IIIQ", 2, 0x1, 8, 0),  # not a reply
        struct.pack("<IIIQ", 2, 0x5, 4, 0),  # wrong size
        b"\0" * 12,
    ):
        with pytest.raises(ProtocolError):
            parse_ack(bad)


def test_channel_waits_for_the_ack() -> None:
    ours, theirs = socket.socketpair()
    channel = BackendChannel(ours.detach(), reply_ack=True)

    def frontend() -> None:
        hdr = theirs.recv(12)
        req, _, _ = struct.unpack("<III", hdr)
        theirs.sendall(struct.pack("<IIIQ", req, 0x5, 8, 0))

    t = threading.Thread(target=frontend)
    t.start()
    channel.config_changed(timeout=5)
    t.join()
    channel.close()
    theirs.close()


def test_a_frontend_that_never_acks_times_out() -> None:
    ours, theirs = socket.socketpair()
    channel = BackendChannel(ours.detach(), reply_ack=True)
    with pytest.raises(TimeoutError):
        channel.config_changed(timeout=0.2)
    channel.close()
    theirs.close()


def test_not_a_socket_is_refused() -> None:
    import os

    r, w = os.pipe()
    with pytest.raises(ProtocolError):
        BackendChannel(r, reply_ack=False)
    os.close(r)
    os.close(w)
