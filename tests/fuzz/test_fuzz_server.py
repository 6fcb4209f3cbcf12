"""Fuzz ``vblk serve`` itself over its real socket, one hostile frontend after another.

Each case is one connection: some prefix of a valid handshake (real memfd,
real eventfds, rings running), then hostile traffic: messages with fields at
and past their limits, fds of the wrong kind attached where none belong or
missing where needed (memfds too small for their region, pipes, sockets,
directories, more than the ancillary buffer holds), raw bytes that truncate
or oversize a header, and garbage descriptor chains kicked into a running
ring. Then a probe message shows whether the server kept or dropped us.

After every case: the process is alive; if it dropped us, its log gives the
reason; no exception reached the log; and a well-behaved client
(vblk.client) can connect at once and do a write+read round trip.
"""

from __future__ import annotations

import array
import mmap
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fuzzing import DESC, case, fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

import vblk.client
from vblk.errors import ProtocolError
from vblk.vhost_user.codec import (
    U64,
    Config,
    Empty,
    Inflight,
    MemRegion,
    MemRegionMsg,
    MemTable,
    Message,
    MessageReader,
    Payload,
    Raw,
    VringAddr,
    VringState,
    encode,
)
from vblk.vhost_user.defs import (
    FLAG_NEED_REPLY,
    FLAG_VERSION,
    MAX_PAYLOAD,
    ProtocolFeature,
    Request,
)
from vblk.virtio import defs as vdefs
from vblk.virtio.inflight import queue_region_size, region_size

MEM = 1 << 20
GPA = 0x1_0000_0000
QSIZE = 64
RINGS = [0x0, 0x4000]
DATA = 0x10000
IMG_SIZE = 8 << 20
SERVE_ARGS = ("--num-queues", "2", "--queue-size", "256")
#: How long the probe waits for its reply; past it, the server is assumed to be
#: waiting for the rest of a message we left half-sent (no check depends on it).
PROBE_WAIT = 0.5
#: What the server says when it drops a frontend, one of these per drop.
REASONS = re.compile(r"dropping frontend|frontend connection lost")
CRASHES = re.compile(r"Traceback|internal error|worker failed")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path
    connections: int = 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz-server")
    img, sock, log = tmp / "d.img", tmp / "s.sock", tmp / "serve.log"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(sock), *SERVE_ARGS],
            stderr=out,
        )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    srv = Server(proc, sock, log)
    try:
        yield srv
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = -9
    assert rc == 0, log.read_text()[-3000:]
    assert not CRASHES.search(log.read_text()), log.read_text()[-3000:]


# -- what a hostile frontend sends -------------------------------------------------------

_FD_KINDS = ["mem", "small", "event", "pipe", "sock", "devnull", "dir", "inflight"]
INFLIGHT_SIZE = region_size(2, QSIZE)


def _make_fd(kind: str, inflight: bytes = b"") -> int:
    if kind == "inflight":  # sealable, as QEMU's; its content is what a crashed backend left
        fd = os.memfd_create("fuzz-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, INFLIGHT_SIZE)
        os.pwrite(fd, inflight[:INFLIGHT_SIZE], 0)
        return fd
    if kind in ("mem", "small"):
        fd = os.memfd_create(f"fuzz-{kind}", os.MFD_CLOEXEC)
        os.ftruncate(fd, MEM if kind == "mem" else 4096)
        return fd
    if kind == "event":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "sock":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == "devnull":
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return os.open("/", os.O_RDONLY | os.O_CLOEXEC)


def _prefix(uaddr: int, features: int) -> list[tuple[int, Payload, tuple[str, ...]]]:
    msgs: list[tuple[int, Payload, tuple[str, ...]]] = [
        (Request.GET_FEATURES, Empty(), ()),
        (Request.SET_PROTOCOL_FEATURES, U64(PROTOCOL_FEATURES), ()),
        (Request.SET_OWNER, Empty(), ()),
        (Request.SET_FEATURES, U64(features), ()),
        (Request.SET_MEM_TABLE, MemTable((MemRegion(GPA, MEM, uaddr, 0),)), ("mem",)),
        (Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, QSIZE), ()),
        (Request.SET_INFLIGHT_FD, Inflight(INFLIGHT_SIZE, 0, 2, QSIZE), ("inflight",)),
    ]
    lay = vdefs.ring_layout(QSIZE)
    for i in range(2):
        ua = uaddr + RINGS[i]
        msgs += [
            (Request.SET_VRING_NUM, VringState(i, QSIZE), ()),
            (Request.SET_VRING_BASE, VringState(i, 0), ()),
            (
                Request.SET_VRING_ADDR,
                VringAddr(i, 0, ua + lay.desc, ua + lay.used, ua + lay.avail, 0),
                (),
            ),
            (Request.SET_VRING_CALL, U64(i), ("event",)),
            (Request.SET_VRING_KICK, U64(i), ("event",)),
            (Request.SET_VRING_ENABLE, VringState(i, 1), ()),
        ]
    return msgs


PROTOCOL_FEATURES = sum(
    1 << f
    for f in (
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIG,
        ProtocolFeature.INFLIGHT_SHMFD,
    )
)
PREFIX_LEN = len(_prefix(0, 0))


@st.composite
def _crashed_region(draw: st.DrawFn) -> bytes:
    """An inflight region as a backend that died mid-request leaves it (or a liar forges it)."""
    region = bytearray(INFLIGHT_SIZE)
    part = queue_region_size(QSIZE)
    for q in range(2):
        version = draw(st.sampled_from([1, 1, 7]))
        desc_num = draw(st.sampled_from([QSIZE, QSIZE, 8]))
        last = draw(st.sampled_from([0, QSIZE - 1, QSIZE, 0xFFFF]))
        used = draw(st.sampled_from([0, 0, 3, 0xFFFF]))
        struct.pack_into("<QHHHH", region, q * part, 0, version, desc_num, last, used)
        for head in draw(st.lists(st.integers(0, QSIZE - 1), max_size=6)):
            off = q * part + 16 + 16 * head
            region[off] = draw(st.sampled_from([1, 1, 3]))
            struct.pack_into("<Q", region, off + 8, draw(st.integers(0, 2**64 - 1)))
    return bytes(region)


UADDR = 0x7F55_0000_0000  # the frontend's address of the region (any value will do)

_index = st.sampled_from([0, 1, 2, 255, 256, 2**32 - 1])
_num = st.sampled_from([0, 1, 64, 100, 256, 512, 1024, 0x10000, 2**32 - 1])
_uaddr = st.sampled_from(
    [UADDR, UADDR + 0x10, UADDR + 1, UADDR + MEM - 8, UADDR + MEM, 0, 2**64 - 1]
)
_region = st.builds(
    MemRegion,
    gpa=st.sampled_from([GPA, GPA + 0x1000, 0, 2**64 - 0x1000]),
    size=st.sampled_from([MEM, 4096, 0, MEM + 4096, 2**40, 2**64 - 1]),
    uaddr=st.sampled_from([UADDR, UADDR + 0x1000, 0x1000]),
    mmap_offset=st.sampled_from([0, 4096, MEM, MEM - 1, 2**40, 2**64 - 1]),
)
_message = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                Request.GET_FEATURES,
                Request.GET_PROTOCOL_FEATURES,
                Request.GET_QUEUE_NUM,
                Request.SET_OWNER,
                Request.RESET_OWNER,
                Request.GET_MAX_MEM_SLOTS,
                Request.RESET_DEVICE,
            ]
        ),
        st.just(Empty()),
    ),
    st.tuples(
        st.sampled_from([Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES]),
        st.sampled_from([0, 2**64 - 1, 1 << 30]).map(U64),
    ),
    st.tuples(
        st.sampled_from(
            [
                Request.SET_VRING_NUM,
                Request.SET_VRING_BASE,
                Request.GET_VRING_BASE,
                Request.SET_VRING_ENABLE,
            ]
        ),
        st.builds(VringState, _index, _num),
    ),
    st.tuples(
        st.just(Request.SET_VRING_ADDR),
        st.builds(VringAddr, _index, st.just(0), _uaddr, _uaddr, _uaddr, st.just(0)),
    ),
    st.tuples(
        st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]),
        st.one_of(_index, st.sampled_from([0x100, 0x101])).map(U64),
    ),
    st.tuples(
        st.just(Request.SET_MEM_TABLE),
        st.lists(_region, max_size=3).map(lambda r: MemTable(tuple(r))),
    ),
    st.tuples(
        st.sampled_from([Request.ADD_MEM_REG, Request.REM_MEM_REG]), _region.map(MemRegionMsg)
    ),
    st.tuples(
        st.sampled_from([Request.GET_CONFIG, Request.SET_CONFIG]),
        st.builds(
            lambda off, data: Config(off, len(data), 0, data),
            st.sampled_from([0, 32, 250, 2**32 - 1]),
            st.sampled_from([b"", b"\0", b"\1", bytes(8), bytes(256)]),
        ),
    ),
    st.tuples(
        st.sampled_from([Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD]),
        st.builds(
            Inflight,
            st.sampled_from([0, INFLIGHT_SIZE, INFLIGHT_SIZE - 1, 2**40, 2**64 - 1]),
            st.sampled_from([0, 64, 2**63]),
            st.sampled_from([0, 1, 2, 3, 0xFFFF]),
            st.sampled_from([0, 1, QSIZE, 100, 1024, 0xFFFF]),
        ),
    ),
    st.tuples(st.sampled_from([0, 41, 999]), st.binary(max_size=16).map(Raw)),
)
_raw = st.one_of(
    st.binary(min_size=1, max_size=11).map(lambda b: ("truncated", b)),  # less than a header
    st.builds(  # a header whose size lies: the next message's bytes become its payload
        lambda req, size: ("lying size", struct.pack("<III", req, FLAG_VERSION, size)),
        st.sampled_from([Request.SET_FEATURES, Request.SET_MEM_TABLE, Request.GET_CONFIG]),
        st.sampled_from([0, 4, 7, 9, 64]),
    ),
    st.builds(
        lambda size: ("oversize", struct.pack("<III", Request.SET_MEM_TABLE, FLAG_VERSION, size)),
        st.sampled_from([MAX_PAYLOAD + 1, 2**31, 2**32 - 1]),
    ),
    st.sampled_from([0, 2, 3]).map(lambda v: ("version", struct.pack("<III", 1, v, 0))),
)
_action = st.one_of(
    st.tuples(
        st.just("msg"),
        _message,
        st.lists(st.sampled_from(_FD_KINDS), max_size=3),
        st.booleans(),
    ),
    st.tuples(st.just("raw"), _raw, st.lists(st.sampled_from(_FD_KINDS), max_size=10)),
    st.tuples(
        st.just("chains"),
        st.integers(0, 1),
        st.lists(
            st.tuples(
                st.sampled_from([GPA + DATA, GPA + MEM - 1, GPA + MEM, 0, 2**64 - 16, GPA]),
                st.sampled_from([0, 1, 16, 512, 4096, 2**32 - 1]),
                st.integers(0, 7),
                st.integers(0, QSIZE + 1),
            ),
            min_size=1,
            max_size=6,
        ),
        st.lists(st.integers(0, QSIZE + 1), min_size=1, max_size=4),
        st.sampled_from([0, 0, 1, 0x8000]),  # extra avail idx jump
    ),
)


@fuzz_settings(120)
@given(
    prefix_len=st.one_of(st.just(PREFIX_LEN), st.integers(0, PREFIX_LEN)),
    actions=st.lists(_action, max_size=8),
    inflight=st.one_of(
        st.just(b""), st.binary(min_size=INFLIGHT_SIZE, max_size=INFLIGHT_SIZE), _crashed_region()
    ),
)
def test_hostile_frontends_never_take_the_server_down(
    server: Server, prefix_len: int, actions: list[tuple[object, ...]], inflight: bytes
) -> None:
    with case("live-server"):
        dropped = hostile_connection(server, prefix_len, actions, inflight)
        event("server dropped the frontend" if dropped else "server kept the frontend")
        section = wait_for_disconnect(server)
        assert server.proc.poll() is None, "the server died"
        assert not CRASHES.search(section), section
        if dropped:
            assert REASONS.search(section), f"dropped without a logged reason:\n{section}"
        for what in ("inflight recovered", "inflight fresh", "resubmitting"):
            if what in section:
                event(f"server log: {what}")
        good_client_round_trip(server)


def hostile_connection(
    server: Server, prefix_len: int, actions: list[tuple[object, ...]], inflight: bytes
) -> bool:
    """Run one hostile connection; True if the server hung up on us."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(server.sock))
    server.connections += 1
    guest: mmap.mmap | None = None
    kicks: dict[int, int] = {}
    try:
        try:
            features = 0
            for req, payload, kinds in _prefix(UADDR, 0)[:prefix_len]:
                if req == Request.SET_FEATURES:
                    payload = U64(features)
                fds = [_make_fd(k, inflight) for k in kinds]
                if req == Request.SET_MEM_TABLE:
                    guest = mmap.mmap(fds[0], MEM)
                if req == Request.SET_VRING_KICK:
                    kicks[len(kicks)] = os.dup(fds[0])
                send(s, encode(Message(req, FLAG_VERSION, payload)), fds)
                if req == Request.GET_FEATURES:
                    features = read_u64(s)
                elif req == Request.GET_INFLIGHT_FD:
                    read_reply(s, 24)  # its memfd is dropped with the ancillary data
            for action in actions:
                if action[0] == "msg":
                    (req, payload), kinds, need_reply = action[1], action[2], action[3]  # type: ignore[misc]
                    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
                    fds = [_make_fd(k, inflight) for k in kinds]  # type: ignore[union-attr]
                    send(s, encode(Message(req, flags, payload)), fds)
                elif action[0] == "raw":
                    (_, data), kinds = action[1], action[2]  # type: ignore[misc]
                    send(s, data, [_make_fd(k, inflight) for k in kinds])  # type: ignore[union-attr]
                elif guest is not None and action[1] in kicks:
                    event("garbage chains kicked into a running ring")
                    garbage_chains(guest, kicks[action[1]], *action[1:])  # type: ignore[arg-type]
            return probe(s)
        except (BrokenPipeError, ConnectionResetError):
            return True
    finally:
        s.close()
        for fd in kicks.values():
            os.close(fd)
        if guest is not None:
            guest.close()


def send(s: socket.socket, data: bytes, fds: list[int]) -> None:
    try:
        if fds:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            s.sendall(data)
    finally:
        for fd in fds:
            os.close(fd)


def read_reply(s: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < 12 + size:
        chunk = s.recv(12 + size - len(data))
        if not chunk:
            raise ConnectionResetError
        data += chunk
    return data[12:]


def read_u64(s: socket.socket) -> int:
    return int(struct.unpack_from("<Q", read_reply(s, 8))[0])


def garbage_chains(
    guest: mmap.mmap,
    kick: int,
    q: int,
    descs: list[tuple[int, int, int, int]],
    heads: list[int],
    jump: int,
) -> None:
    """Write descriptors and avail entries straight into the running ring, then kick."""
    lay = vdefs.ring_layout(QSIZE)
    base = RINGS[q]
    struct.pack_into("<IIQ", guest, DATA, 0, 0, 0)  # a valid IN header for those that find it
    for i, d in enumerate(descs):
        DESC.pack_into(guest, base + lay.desc + 16 * i, *d)
    idx = struct.unpack_from("<H", guest, base + lay.avail + 2)[0]
    for h in heads:
        struct.pack_into("<H", guest, base + lay.avail + 4 + 2 * (idx % QSIZE), h)
        idx += 1
    struct.pack_into("<H", guest, base + lay.avail + 2, (idx + jump) & 0xFFFF)
    os.eventfd_write(kick, 1)


def probe(s: socket.socket) -> bool:
    """Ask GET_FEATURES; True if the server hung up instead of answering."""
    s.settimeout(PROBE_WAIT)
    reader = MessageReader()
    try:
        s.sendall(encode(Message(Request.GET_FEATURES, FLAG_VERSION, Empty())))
        while True:  # replies to earlier NEED_REPLY messages may come first
            chunk = s.recv(4096)
            if not chunk:
                return True
            reader.feed(chunk)
            while (m := reader.next()) is not None:
                if m.request == Request.GET_FEATURES:
                    return False
    except (BrokenPipeError, ConnectionResetError):
        return True
    except (TimeoutError, ProtocolError):
        return False  # still connected (maybe mid-message): we hang up ourselves
    finally:
        reader.close()


def wait_for_disconnect(server: Server) -> str:
    """Wait until the server has finished with every connection so far; its log section."""
    deadline = time.monotonic() + 30
    while True:
        text = server.log.read_text()
        if text.count("frontend disconnected") >= server.connections:
            break
        assert server.proc.poll() is None, text[-3000:]
        assert time.monotonic() < deadline, f"connection never ended:\n{text[-3000:]}"
        time.sleep(0.01)
    start = text.rfind("frontend connected")
    return text[start:]


def good_client_round_trip(server: Server) -> None:
    data = os.urandom(4096)
    sector = int.from_bytes(data[:2], "little") % (IMG_SIZE // 4096) * 8
    server.connections += 1
    with vblk.client.connect(str(server.sock), num_queues=2, timeout=10, mem_size=1 << 20) as dev:
        dev.write(sector * 512, data)
        assert dev.read(sector * 512, 4096) == data
        dev.flush()
    wait_for_disconnect(server)
