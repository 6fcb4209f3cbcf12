"""vblk.storage.rbd: the completion hand-off with a fake image, then a real single-node Ceph."""

from __future__ import annotations

import errno
import select
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from ceph_cluster import CephCluster, start

from vblk.storage.base import FLAG_UNMAP, Completion, Op, StorageError
from vblk.storage.rbd import THICK_PROVISION, RbdQueue, open_rbd, parse_rbd_spec

# --- the hand-off, with a fake image ------------------------------------------------------


class FakeCompletion:
    def __init__(self, ret: int) -> None:
        self.ret = ret

    def get_return_value(self) -> int:
        return self.ret


class FakeImage:
    """librbd's aio surface over a bytearray; callbacks wait in ``pending`` until delivered."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)
        self.pending: list[Callable[[], None]] = []
        self.calls: list[tuple[str, object]] = []
        self.fail: int = 0  # > 0: every operation completes with -fail

    def _later(self, cb: Callable[..., None], ret: int, *extra: object) -> None:
        ret = -self.fail if self.fail else ret
        args = (None,) if ret < 0 and extra else extra
        self.pending.append(lambda: cb(FakeCompletion(ret), *args))

    def aio_read(self, offset: int, length: int, cb: Callable[..., None]) -> None:
        if offset + length > len(self.data):
            raise OSError(errno.EINVAL, "out of range")
        self._later(cb, length, bytes(self.data[offset : offset + length]))

    def aio_write(self, data: bytes, offset: int, cb: Callable[..., None]) -> None:
        assert isinstance(data, bytes)  # what the Pacific binding insists on
        if not self.fail:
            self.data[offset : offset + len(data)] = data
        self._later(cb, 0)

    def aio_flush(self, cb: Callable[..., None]) -> None:
        self.calls.append(("flush", None))
        self._later(cb, 0)

    def aio_discard(self, offset: int, length: int, cb: Callable[..., None]) -> None:
        self.calls.append(("discard", (offset, length)))
        self._later(cb, 0)

    def aio_write_zeroes(
        self, offset: int, length: int, cb: Callable[..., None], zero_flags: int = 0
    ) -> None:
        self.calls.append(("write_zeroes", zero_flags))
        self.data[offset : offset + length] = bytes(length)
        self._later(cb, 0)

    def deliver(self, threads: int = 4) -> None:
        """Run the pending callbacks on other threads, as librbd does."""
        todo, self.pending = self.pending, []
        workers = [threading.Thread(target=lambda f=f: f()) for f in todo]
        for i in range(0, len(workers), threads):
            for w in workers[i : i + threads]:
                w.start()
            for w in workers[i : i + threads]:
                w.join()


def wait_reap(q: RbdQueue, count: int, timeout: float = 10.0) -> dict[object, int]:
    """Poll the queue's fd like an I/O thread until ``count`` completions are reaped."""
    got: list[Completion] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert q.fd is not None
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {count} completions"
        select.select([q.fd], [], [], left)
        q.clear_signal()
        got += q.reap()
    return dict(got)


def test_write_then_read_moves_bytes_between_guest_buffers_and_image() -> None:
    img = FakeImage()
    q = RbdQueue(img, 64)
    src = memoryview(bytearray(b"a" * 512 + b"b" * 1024))
    q.submit(Op.WRITE, 4096, 1536, [src[:512], src[512:]], 0, "w")
    assert q.inflight == 1 and not q.ready()
    img.deliver()
    assert wait_reap(q, 1) == {"w": 1536}
    assert img.data[4096 : 4096 + 1536] == bytes(src)
    dst = memoryview(bytearray(1536))
    q.submit(Op.READ, 4096, 1536, [dst[:1000], dst[1000:]], 0, "r")
    img.deliver()
    assert wait_reap(q, 1) == {"r": 1536}
    assert bytes(dst) == bytes(src)
    assert q.inflight == 0
    q.close()


def test_many_completions_from_other_threads_each_reaped_once() -> None:
    img = FakeImage()
    q = RbdQueue(img, 256)
    bufs = [memoryview(bytearray(512)) for _ in range(200)]
    for i, b in enumerate(bufs):
        q.submit(Op.READ, i * 512, 512, [b], 0, i)
    q.submit(Op.FLUSH, 0, 0, [], 0, "f")
    assert q.inflight == 201
    img.deliver(threads=8)
    done = wait_reap(q, 201)
    assert done == {**{i: 512 for i in range(200)}, "f": 0}
    assert q.inflight == 0 and not q.ready()
    q.close()


def test_errors_come_back_as_negative_errno() -> None:
    img = FakeImage()
    img.fail = errno.ETIMEDOUT
    q = RbdQueue(img, 8)
    dst = memoryview(bytearray(512))
    q.submit(Op.READ, 0, 512, [dst], 0, "r")
    q.submit(Op.WRITE, 0, 512, [dst], 0, "w")
    q.submit(Op.FLUSH, 0, 0, [], 0, "f")
    img.deliver()
    assert wait_reap(q, 3) == {"r": -errno.ETIMEDOUT, "w": -errno.ETIMEDOUT, "f": -errno.ETIMEDOUT}
    q.close()


def test_a_call_librbd_refuses_still_completes_once_with_its_errno() -> None:
    q = RbdQueue(FakeImage(4096), 8)
    q.submit(Op.READ, 1 << 30, 512, [memoryview(bytearray(512))], 0, "oob")
    q.submit(99, 0, 0, [], 0, "unknown-op")
    assert wait_reap(q, 2) == {"oob": -errno.EINVAL, "unknown-op": -errno.EOPNOTSUPP}
    assert q.inflight == 0
    q.close()


def test_discard_and_write_zeroes_map_to_rbd_calls_and_unmap_flag() -> None:
    img = FakeImage()
    img.data[0:4096] = b"x" * 4096
    q = RbdQueue(img, 8)
    q.submit(Op.DISCARD, 8192, 4096, [], 0, "d")
    q.submit(Op.WRITE_ZEROES, 0, 2048, [], 0, "z")
    q.submit(Op.WRITE_ZEROES, 2048, 2048, [], FLAG_UNMAP, "zu")
    img.deliver()
    assert wait_reap(q, 3) == {"d": 0, "z": 0, "zu": 0}
    assert img.calls == [
        ("discard", (8192, 4096)),
        ("write_zeroes", THICK_PROVISION),
        ("write_zeroes", 0),
    ]
    assert img.data[0:4096] == bytes(4096)
    q.close()


def test_completions_after_close_are_dropped_without_touching_guest_memory() -> None:
    img = FakeImage()
    img.data[0:512] = b"z" * 512
    q = RbdQueue(img, 8)
    dst = memoryview(bytearray(512))
    q.submit(Op.READ, 0, 512, [dst], 0, "late")
    q.submit(Op.FLUSH, 0, 0, [], 0, "late-flush")
    q.close()
    assert q.fd is None
    img.deliver()  # must neither raise on librbd's threads nor write to a closed fd
    assert bytes(dst) == bytes(512)
    assert q.reap() == [] and not q.ready()


def test_completion_racing_close_from_another_thread_is_safe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    img = FakeImage()
    q = RbdQueue(img, 512)
    for i in range(500):
        q.submit(Op.FLUSH, 0, 0, [], 0, i)
    t = threading.Thread(target=img.deliver, kwargs={"threads": 16})
    t.start()
    time.sleep(0.001)
    q.close()
    t.join()
    assert errors == []
    assert {token for token, _ in q.reap()} <= set(range(500))


def test_parse_spec() -> None:
    assert parse_rbd_spec("pool/img") == ("pool", "img", None)
    assert parse_rbd_spec("pool/img@snap1") == ("pool", "img", "snap1")
    for bad in ("img", "/img", "pool/", "pool/a/b", "pool/img@", "pool/img@a@b"):
        with pytest.raises(StorageError, match="expected rbd:POOL/IMAGE"):
            parse_rbd_spec(bad)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"colour": "blue"}, "unknown --opt colour"),
        ({"timeout": "soon"}, "expected seconds"),
        ({"lock_wait": "-1"}, "expected seconds"),
        ({"conf": "/nonexistent/ceph.conf"}, "no Ceph config /nonexistent/ceph.conf"),
    ],
)
def test_bad_options_are_one_line_before_any_connection(opts: dict[str, str], message: str) -> None:
    with pytest.raises(StorageError, match=message) as err:
        open_rbd("pool/img", opts, False)
    assert "\n" not in str(err.value)


# --- against a real cluster ---------------------------------------------------------------


def _opts(ceph: CephCluster, **extra: str) -> dict[str, str]:
    return {"conf": str(ceph.conf), "timeout": "5", **extra}


@pytest.mark.interop
def test_rbd_io_many_in_flight(ceph: CephCluster) -> None:
    spec = ceph.create_image("unit-io", 16 << 20)
    storage = open_rbd(spec, _opts(ceph), False)
    try:
        caps = storage.caps
        assert caps.size == 16 << 20 and caps.writable and caps.discard and caps.write_zeroes
        assert caps.opt_io_size == 4 << 20 and caps.discard_granularity == 4 << 20
        q = storage.open_queue(0, 128)
        src = bytearray(128 * 4096)
        for i in range(128):
            src[i * 4096 : (i + 1) * 4096] = bytes([i + 1]) * 4096
        view = memoryview(src)
        for i in range(128):
            q.submit(Op.WRITE, i * 4096, 4096, [view[i * 4096 : (i + 1) * 4096]], 0, i)
        assert q.inflight == 128
        assert wait_reap(q, 128) == {i: 4096 for i in range(128)}
        q.submit(Op.FLUSH, 0, 0, [], 0, "f")
        assert wait_reap(q, 1) == {"f": 0}
        dst = memoryview(bytearray(len(src)))
        for i in range(64):
            chunk = dst[i * 8192 : (i + 1) * 8192]
            q.submit(Op.READ, i * 8192, 8192, [chunk[:512], chunk[512:]], 0, i)
        assert wait_reap(q, 64) == {i: 8192 for i in range(64)}
        assert bytes(dst) == bytes(src)
        q.submit(Op.WRITE_ZEROES, 0, 4096, [], 0, "z")
        q.submit(Op.DISCARD, 4 << 20, 4 << 20, [], 0, "d")
        q.submit(Op.READ, 16 << 20, 4096, [dst[:4096]], 0, "past-end")
        done = wait_reap(q, 3)
        assert done["z"] == 0 and done["d"] == 0 and done["past-end"] < 0
        q.close()
    finally:
        storage.close()
    assert ceph.read("unit-io", 0, 8192) == bytes(4096) + bytes([2]) * 4096


@pytest.mark.interop
def test_rbd_open_errors_are_one_line(ceph: CephCluster, tmp_path: Any) -> None:
    ceph.create_image("unit-errors", 1 << 20)
    cases = [
        ("nosuchpool/img", "no pool 'nosuchpool'"),
        (f"{ceph.pool}/nosuchimage", "no image 'nosuchimage'"),
        (f"{ceph.pool}/unit-errors@nosnap", "no snapshot 'nosnap'"),
    ]
    for spec, message in cases:
        with pytest.raises(StorageError, match=message) as err:
            open_rbd(spec, _opts(ceph), False)
        assert "\n" not in str(err.value)
    dead = tmp_path / "dead.conf"
    conf = ceph.conf.read_text()
    dead.write_text(conf.replace(f"127.0.0.1:{ceph.port}", "127.0.0.1:1"))
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the Ceph cluster"):
        open_rbd(f"{ceph.pool}/unit-errors", {"conf": str(dead), "timeout": "2"}, False)
    assert time.monotonic() - t0 < 30


@pytest.mark.interop
def test_rbd_bad_credentials_are_one_line(tmp_path: Any) -> None:
    """A cluster of its own with cephx on: an unknown client, a wrong key, a missing keyring."""
    cluster = start(base=tmp_path, cephx=True, store_bytes=64 << 20)
    try:
        spec = cluster.create_image("creds", 1 << 20)
        opened = open_rbd(spec, {"conf": str(cluster.conf)}, False)  # the right key works
        opened.close()
        wrong = tmp_path / "wrong.keyring"
        subprocess.run(
            ["ceph-authtool", "--create-keyring", str(wrong), "--gen-key", "-n", "client.admin"],
            check=True,
            capture_output=True,
        )
        cases = [
            ({"id": "nobody"}, "the cluster refused client.nobody"),
            ({"keyring": str(wrong)}, "the cluster refused client.admin"),
            ({"keyring": str(tmp_path / "missing")}, "no keyring"),
        ]
        for opts, message in cases:
            with pytest.raises(StorageError, match=message) as err:
                open_rbd(spec, {"conf": str(cluster.conf), "timeout": "10", **opts}, False)
            assert "\n" not in str(err.value)
    finally:
        cluster.stop()


@pytest.mark.interop
def test_rbd_snapshot_is_read_only(ceph: CephCluster) -> None:
    spec = ceph.create_image("unit-snap", 1 << 20)
    with_data = open_rbd(spec, _opts(ceph), False)
    q = with_data.open_queue(0, 4)
    q.submit(Op.WRITE, 0, 512, [memoryview(b"s" * 512)], 0, "w")
    assert wait_reap(q, 1) == {"w": 512}
    q.close()
    with_data.close()
    snap = ceph.snapshot("unit-snap", "s1")
    storage = open_rbd(snap, _opts(ceph), False)
    try:
        assert not storage.caps.writable and not storage.caps.discard
        assert not storage.locked
        q = storage.open_queue(0, 4)
        dst = memoryview(bytearray(512))
        q.submit(Op.READ, 0, 512, [dst], 0, "r")
        q.submit(Op.WRITE, 0, 512, [dst], 0, "w")
        done = wait_reap(q, 2)
        assert done["r"] == 512 and bytes(dst) == b"s" * 512
        assert done["w"] == -errno.EROFS
        q.close()
        with pytest.raises(StorageError, match="read-only"):
            storage.resize(2 << 20)
    finally:
        storage.close()


@pytest.mark.interop
def test_rbd_exclusive_lock_refuses_a_second_writer_until_released(ceph: CephCluster) -> None:
    spec = ceph.create_image("unit-lock", 1 << 20)
    first = open_rbd(spec, _opts(ceph), False)
    assert first.locked
    try:
        with pytest.raises(StorageError, match=r"in use: another client .* exclusive lock"):
            open_rbd(spec, _opts(ceph), False)
        reader = open_rbd(spec, _opts(ceph), True)  # read-only opens take no lock
        reader.close()
        release = threading.Timer(1.0, first.close)
        release.start()
        second = open_rbd(spec, _opts(ceph, lock_wait="30"), False)
        release.join()
        assert second.locked
        second.close()
    finally:
        if first.locked:
            first.close()


@pytest.mark.interop
def test_rbd_resize_grows_the_image(ceph: CephCluster) -> None:
    spec = ceph.create_image("unit-resize", 1 << 20)
    storage = open_rbd(spec, _opts(ceph), False)
    try:
        assert storage.resize(3 << 20).size == 3 << 20
        assert storage.caps.size == 3 << 20
    finally:
        storage.close()


@pytest.mark.interop
def test_rbd_requests_fail_in_bounded_time_while_the_cluster_is_away(ceph: CephCluster) -> None:
    """OSD down: -ETIMEDOUT after ``timeout``, no hang; OSD back: the same queue works again."""
    spec = ceph.create_image("unit-away", 1 << 20)
    storage = open_rbd(spec, _opts(ceph, timeout="3"), False)
    q = storage.open_queue(0, 8)
    buf = memoryview(bytearray(b"k" * 4096))
    try:
        # Written first, so the read below needs the OSD (the object map knows it exists).
        q.submit(Op.WRITE, 0, 4096, [buf], 0, "first")
        assert wait_reap(q, 1) == {"first": 4096}
        ceph.stop_osd()
        try:
            t0 = time.monotonic()
            q.submit(Op.WRITE, 0, 4096, [buf], 0, "w")
            q.submit(Op.READ, 0, 4096, [memoryview(bytearray(4096))], 0, "r")
            done = wait_reap(q, 2, timeout=60)
            assert time.monotonic() - t0 < 30
            assert done["w"] in (-errno.ETIMEDOUT, -errno.EIO)
            assert done["r"] in (-errno.ETIMEDOUT, -errno.EIO)
        finally:
            ceph.start_osd()
        deadline = time.monotonic() + 90
        while True:
            q.submit(Op.WRITE, 0, 4096, [buf], 0, "again")
            result = wait_reap(q, 1, timeout=60)["again"]
            if result == 4096 or time.monotonic() > deadline:
                break
        assert result == 4096
    finally:
        q.close()
        storage.close()
    assert ceph.read("unit-away", 0, 4096) == bytes(buf)
