"""Parsing chains into virtio-blk requests: header placement, status byte, bad shapes."""

import struct

import pytest

from vblk.blk.defs import ReqType, Status
from vblk.blk.request import RequestError, parse_request
from vblk.virtio.queue import Chain


def hdr(rtype: int, sector: int) -> memoryview:
    return memoryview(bytearray(struct.pack("<IIQ", rtype, 0, sector)))


def buf(n: int, fill: int = 0) -> memoryview:
    return memoryview(bytearray([fill]) * n)


def test_read_request_splits_data_and_status() -> None:
    data, status = buf(4096), buf(1, 0xFF)
    req = parse_request(Chain(0, [hdr(ReqType.IN, 8)], [data, status]))
    assert (req.type, req.sector, req.in_len, req.out_len) == (ReqType.IN, 8, 4096, 0)
    req.status[0] = 0
    assert status[0] == 0


def test_status_byte_shares_the_last_data_descriptor() -> None:
    tail = buf(513)
    req = parse_request(Chain(1, [hdr(ReqType.IN, 0)], [tail]))
    assert req.in_len == 512
    req.status[0] = 7
    assert tail[512] == 7


def test_header_split_across_descriptors() -> None:
    h = bytes(hdr(ReqType.OUT, 0x1122334455))
    parts = [
        memoryview(bytearray(h[:3])),
        memoryview(bytearray(h[3:12])),
        memoryview(bytearray(h[12:] + b"D" * 512)),
    ]
    req = parse_request(Chain(2, parts, [buf(1)]))
    assert (req.type, req.sector, req.out_len) == (ReqType.OUT, 0x1122334455, 512)
    assert bytes(req.out[0]) == b"D" * 512


def test_header_in_one_descriptor_with_data_after_it() -> None:
    first = memoryview(bytearray(bytes(hdr(ReqType.OUT, 3)) + b"x" * 1024))
    req = parse_request(Chain(3, [first], [buf(1)]))
    assert req.out_len == 1024 and bytes(req.out[0][:1]) == b"x"


def test_short_header_is_ioerr_with_status() -> None:
    status = buf(1)
    with pytest.raises(RequestError) as e:
        parse_request(Chain(4, [buf(8)], [status]))
    assert e.value.status == Status.IOERR and e.value.status_buf is not None


def test_no_writable_descriptor_has_nowhere_to_report() -> None:
    with pytest.raises(RequestError) as e:
        parse_request(Chain(5, [hdr(ReqType.IN, 0)], []))
    assert e.value.status_buf is None


def test_broken_chain_reports_ioerr_into_last_writable_byte() -> None:
    status = buf(1, 0xAA)
    with pytest.raises(RequestError) as e:
        parse_request(Chain(6, [hdr(ReqType.IN, 0)], [status], error="loop"))
    assert e.value.status == Status.IOERR
    assert e.value.status_buf is not None
    e.value.status_buf[0] = Status.IOERR
    assert status[0] == Status.IOERR
