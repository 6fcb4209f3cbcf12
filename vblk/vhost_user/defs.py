"""vhost-user wire constants (QEMU docs/interop/vhost-user.rst).

Kept apart from the codec so the session and the server can name requests and
feature bits without pulling in the parser.
"""

from __future__ import annotations

from enum import IntEnum


class Request(IntEnum):
    """Front-end message codes: the ``request`` field of the header."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(IntEnum):
    """Bit numbers in the GET/SET_PROTOCOL_FEATURES mask (not masks themselves)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


#: Header ``flags``: the low two bits carry the protocol version, which is 1.
FLAG_VERSION = 0x1
VERSION_MASK = 0x3
#: Set on every message a back-end sends in answer to a request.
FLAG_REPLY = 0x4
#: The front-end asks for a REPLY_ACK (only honoured once REPLY_ACK is negotiated).
FLAG_NEED_REPLY = 0x8

#: SET_VRING_KICK/CALL/ERR u64: the queue index lives in the low byte ...
VRING_IDX_MASK = 0xFF
#: ... and this bit says no fd accompanies the message (polling mode).
VRING_NOFD_MASK = 0x100

#: u32 request, u32 flags, u32 size.
HEADER_SIZE = 12
#: Far above any payload a block backend meets (a 256-byte config space plus
#: its 12-byte header, or a table of 8 memory regions), so a larger size means
#: the stream is garbage rather than a message worth buffering.
MAX_PAYLOAD = 4096
#: Fds one message may carry (QEMU's VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8
#: Regions a SET_MEM_TABLE may describe.
MEM_TABLE_MAX_REGIONS = 8
#: Largest device config space GET/SET_CONFIG may carry.
CONFIG_SPACE_MAX = 256


class BackendRequest(IntEnum):
    """Back-end message codes, sent on the channel SET_BACKEND_REQ_FD hands over."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
