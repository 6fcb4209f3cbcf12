"""Turn a descriptor chain into a virtio-blk request, trusting nothing in it.

Parsing is separate from execution (as in rust-vmm's virtio-blk): this module
only looks at the chain's shape and header and says what the guest asked for,
or why the request must fail and where its status byte is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vblk.blk.defs import HEADER_SIZE, Status
from vblk.virtio.queue import Chain

#: The request header: type, reserved, sector (virtio 1.2, 5.2.6).
HEADER = struct.Struct("<IIQ")


class RequestError(Exception):
    """The request cannot be executed; ``status_buf`` is where to say so, if anywhere."""

    def __init__(self, reason: str, status: Status, status_buf: memoryview | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.status_buf = status_buf


@dataclass(slots=True)
class BlkRequest:
    """One parsed request.

    ``out`` holds the device-readable bytes after the header (OUT data, discard
    segments); ``in_`` the device-writable bytes before the status byte (IN
    data, the GET_ID answer). Both are views of guest memory, never copies.
    """

    type: int
    sector: int
    out: list[memoryview]
    out_len: int
    in_: list[memoryview]
    in_len: int
    status: memoryview


def parse_request(chain: Chain) -> BlkRequest:
    """Split ``chain`` into header, data and status; RequestError if it is malformed."""
    writable = chain.writable
    status: memoryview | None = None
    if writable and len(writable[-1]) >= 1:
        last = writable[-1]
        status = last[len(last) - 1 :]
    if chain.error is not None:
        raise RequestError(f"bad descriptor chain: {chain.error}", Status.IOERR, status)
    if status is None:
        raise RequestError("no device-writable status byte", Status.IOERR, None)

    readable = chain.readable
    first = readable[0] if readable else None
    if first is not None and len(first) >= HEADER_SIZE:
        rtype, _, sector = HEADER.unpack_from(first)
        out = [first[HEADER_SIZE:]] if len(first) > HEADER_SIZE else []
        out.extend(readable[1:])
    else:
        # The header spans descriptors (allowed with VERSION_1): gather it.
        head = bytearray()
        out = []
        for seg in readable:
            need = HEADER_SIZE - len(head)
            if need > 0:
                head += seg[:need]
                if len(seg) > need:
                    out.append(seg[need:])
            else:
                out.append(seg)
        if len(head) < HEADER_SIZE:
            raise RequestError("request header shorter than 16 bytes", Status.IOERR, status)
        rtype, _, sector = HEADER.unpack_from(head)

    in_ = writable[:-1]
    last = writable[-1]
    if len(last) > 1:
        in_.append(last[:-1])
    return BlkRequest(rtype, sector, out, sum(map(len, out)), in_, sum(map(len, in_)), status)
