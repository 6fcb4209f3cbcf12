"""Ceph RBD images through librbd's Python binding: ``vblk serve rbd:POOL/IMAGE[@SNAPSHOT]``.

Connection options (``--opt KEY=VALUE``), with the ``rbd`` CLI's defaults:

- ``conf``: the ceph.conf; default ``$CEPH_CONF``, else ``/etc/ceph/ceph.conf``;
- ``id``: the client name without ``client.``; default ``admin``;
- ``keyring``: default from the ceph.conf (``/etc/ceph/ceph.client.ID.keyring``...);
- ``timeout``: seconds (default 30) that connecting, monitor commands and each
  OSD operation may take: a cluster that is unreachable fails the open, and one
  that goes away while serving fails requests with ``-ETIMEDOUT`` (virtio IOERR)
  instead of holding them forever. The same connection serves new requests
  once the OSDs are back; nothing is reopened;
- ``lock_wait``: seconds (default 0) to wait for the image's exclusive lock when
  another client holds it (see below).

librbd's own cache is off (``rbd_cache=false``): a write completes to the
guest once the OSDs have it, so killing or restarting ``vblk serve`` loses
nothing the guest saw complete, as with a file.

A snapshot (``@SNAP``) is opened read-only, as is every image under ``--read-only``.

**Exclusive lock.** A writable open of an image with the ``exclusive-lock``
feature (the default for new images) takes the lock explicitly
(``lock_acquire``) and keeps it until close, so a second client, such as
``vblk serve`` on another host, cannot take it over by writing: its open
fails with one line naming the holder, or waits ``lock_wait`` seconds for
it. A client that died keeps the lock until the OSDs notice its watch is
gone (``osd_client_watch_timeout``, 30 s by default); a restart after a
crash therefore wants ``lock_wait`` a little longer than that.

**Copies.** The binding (Debian's 16.2 Pacific) cannot use guest memory in
place: ``aio_write`` takes ``bytes``, so a write first joins the guest's
buffers into one bytes object, and ``aio_read`` hands its callback a new
``bytes``, which is copied into the guest's buffers. That is one memcpy per
request each way, on the I/O thread: measured on the 2-core CI machine at
about 0.4 µs for 4 KiB, 20 µs for 128 KiB and 120-150 µs for 1 MiB (README,
"Ceph RBD"), small beside a round trip to an OSD but not free at large sizes.

**Completions.** librbd calls back on its own threads. A callback only
records the result and hands it to the queue's :class:`CompletionChannel`;
the I/O thread reaps it and is the only one that touches guest memory (the
read copy happens at reap), so a callback that arrives after the queue
closed is dropped without touching anything.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from vblk.storage.base import (
    FLAG_UNMAP,
    Capabilities,
    Completion,
    CompletionChannel,
    Op,
    StorageError,
)

__all__ = ["RbdQueue", "RbdStorage", "open_rbd", "parse_rbd_spec"]

log = logging.getLogger(__name__)

OPTIONS = ("conf", "id", "keyring", "timeout", "lock_wait")
DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_TIMEOUT = 30.0
#: librbd's RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: zero without deallocating.
THICK_PROVISION = 1


def parse_rbd_spec(spec: str) -> tuple[str, str, str | None]:
    """``POOL/IMAGE[@SNAPSHOT]`` into its parts; StorageError if it is not that shape."""
    rest, at, snap = spec.partition("@")
    pool, slash, image = rest.partition("/")
    if not slash or not pool or not image or "/" in image or (at and not snap) or "@" in snap:
        raise StorageError(f"rbd:{spec}: expected rbd:POOL/IMAGE or rbd:POOL/IMAGE@SNAPSHOT")
    return pool, image, snap if at else None


def _seconds(opts: dict[str, str], key: str, default: float) -> float:
    text = opts.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise StorageError(f"--opt {key}={text}: expected seconds (0 to 86400)")
    return value


def _errno(exc: BaseException) -> int:
    """The errno of a rados/rbd exception (they carry it), EIO for anything else."""
    code = getattr(exc, "errno", None)
    return code if isinstance(code, int) and code > 0 else errno.EIO


def open_rbd(spec: str, opts: dict[str, str], read_only: bool) -> RbdStorage:
    """Connect to the cluster and open ``POOL/IMAGE[@SNAPSHOT]`` (``spec`` without ``rbd:``)."""
    pool, name, snap = parse_rbd_spec(spec)
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise StorageError(
            f"rbd:{spec}: unknown --opt {', '.join(unknown)} (rbd takes {', '.join(OPTIONS)})"
        )
    timeout = _seconds(opts, "timeout", DEFAULT_TIMEOUT)
    lock_wait = _seconds(opts, "lock_wait", 0.0)
    conf = opts.get("conf") or os.environ.get("CEPH_CONF") or DEFAULT_CONF
    if not os.path.isfile(conf):
        raise StorageError(f"rbd:{spec}: no Ceph config {conf} (--opt conf=PATH or CEPH_CONF)")
    client = opts.get("id", "admin")
    try:
        import rados
        import rbd  # noqa: F401  (checked here, used by RbdStorage)
    except ImportError as e:
        raise StorageError(f"the RBD backend needs python3-rados and python3-rbd ({e})") from None

    secs = str(max(1, round(timeout))) if timeout else "0"
    settings = {
        "rados_mon_op_timeout": secs,
        "rados_osd_op_timeout": secs,
        "client_mount_timeout": secs,
        # Without librbd's cache a completed write is on the OSDs, not in this process,
        # so a vblk killed or restarted loses no write the guest saw complete.
        "rbd_cache": "false",
        "log_to_stderr": "false",
        "err_to_stderr": "false",
    }
    if "keyring" in opts:
        if not os.path.isfile(opts["keyring"]):
            raise StorageError(f"rbd:{spec}: no keyring {opts['keyring']}")
        settings["keyring"] = opts["keyring"]
    who = f"client.{client}"
    try:
        cluster = rados.Rados(conffile=conf, rados_id=client, conf=settings)
    except rados.Error as e:
        raise StorageError(f"rbd:{spec}: bad Ceph settings ({conf}): {e}") from None
    try:
        try:
            cluster.connect(timeout=max(1, round(timeout)) if timeout else 0)
        except (rados.PermissionDeniedError, rados.PermissionError) as e:
            raise StorageError(f"rbd:{spec}: the cluster refused {who}: {e}") from None
        except (rados.TimedOut, rados.InterruptedOrTimeoutError) as e:
            raise StorageError(
                f"rbd:{spec}: cannot reach the Ceph cluster of {conf} within {timeout:g} s ({e})"
            ) from None
        except rados.Error as e:
            raise StorageError(f"rbd:{spec}: cannot connect to the cluster as {who}: {e}") from None
        try:
            ioctx = cluster.open_ioctx(pool)
        except rados.ObjectNotFound:
            raise StorageError(f"rbd:{spec}: no pool {pool!r} in the cluster") from None
        except rados.Error as e:
            raise StorageError(f"rbd:{spec}: cannot open pool {pool!r}: {e}") from None
    except BaseException:
        cluster.shutdown()
        raise
    try:
        return RbdStorage(spec, cluster, ioctx, name, snap, read_only, lock_wait)
    except BaseException:
        ioctx.close()
        cluster.shutdown()
        raise


def _open_image(spec: str, ioctx: Any, name: str, snap: str | None, read_only: bool) -> Any:
    import rbd

    try:
        return rbd.Image(ioctx, name, snapshot=snap, read_only=read_only)
    except rbd.ImageNotFound:
        if snap is not None and name in rbd.RBD().list(ioctx):
            raise StorageError(f"rbd:{spec}: image has no snapshot {snap!r}") from None
        raise StorageError(f"rbd:{spec}: no image {name!r} in pool {ioctx.name!r}") from None
    except rbd.Error as e:
        raise StorageError(f"rbd:{spec}: cannot open the image: {e}") from None


def _take_lock(spec: str, image: Any, wait: float) -> None:
    """Hold the exclusive lock until close; StorageError naming the holder if it stays taken."""
    import rbd

    deadline = time.monotonic() + wait
    while True:
        try:
            image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            return
        except (rbd.ReadOnlyImage, rbd.ImageBusy) as e:
            if time.monotonic() >= deadline:
                try:
                    owners = ", ".join(o["owner"] for o in image.lock_get_owners()) or "unknown"
                except rbd.Error:
                    owners = "unknown"
                waited = f" after waiting {wait:g} s" if wait else ""
                raise StorageError(
                    f"rbd:{spec}: in use: another client ({owners}) holds its exclusive lock"
                    f"{waited} (--opt lock_wait=SECONDS to wait for it)"
                ) from e
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        except rbd.Error as e:
            raise StorageError(f"rbd:{spec}: cannot take the exclusive lock: {e}") from None


class RbdStorage:
    """One open RBD image (and its cluster connection), shared by all queues."""

    def __init__(
        self,
        spec: str,
        cluster: Any,
        ioctx: Any,
        name: str,
        snap: str | None,
        read_only: bool,
        lock_wait: float = 0.0,
    ) -> None:
        import rbd

        self.spec = spec
        self._cluster = cluster
        self._ioctx = ioctx
        self._read_only = read_only or snap is not None
        self.image = _open_image(spec, ioctx, name, snap, self._read_only)
        self.locked = False
        try:
            if not self._read_only and self.image.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
                _take_lock(spec, self.image, lock_wait)
                self.locked = True
            elif not self._read_only:
                log.warning(
                    "rbd:%s has no exclusive-lock feature: nothing stops another client writing it",
                    spec,
                )
            self.object_size = int(self.image.stat()["obj_size"])
            self.caps = self._caps(self.image.size())
        except BaseException:
            self.image.close()
            raise
        mode = "snapshot, read-only" if snap else ("read-only" if self._read_only else "read-write")
        self.description = f"rbd:{spec} ({mode}, {self.object_size >> 10} KiB objects" + (
            ", exclusive lock held)" if self.locked else ")"
        )

    def _caps(self, size: int) -> Capabilities:
        writable = not self._read_only
        return Capabilities(
            size=size - size % 512,
            block_size=512,
            writable=writable,
            flush=True,
            discard=writable,
            write_zeroes=writable,
            zeroes_unmap=writable,
            opt_io_size=self.object_size,
            discard_granularity=self.object_size,
        )

    def open_queue(self, index: int, depth: int) -> RbdQueue:
        return RbdQueue(self.image, depth)

    def resize(self, size: int) -> Capabilities:
        if self._read_only:
            raise StorageError(f"rbd:{self.spec} is read-only; it cannot be resized")
        if size <= 0 or size % 512:
            raise StorageError(f"resize to {size}: expected a positive multiple of 512 bytes")
        try:
            self.image.resize(size)
        except Exception as e:
            raise StorageError(f"rbd:{self.spec}: resize to {size} failed: {e}") from None
        self.caps = self._caps(self.image.size())
        return self.caps

    def close(self) -> None:
        """Release the lock and the image, then the connection (each step even if one fails)."""
        try:
            if self.locked:
                try:
                    self.image.lock_release()
                except Exception as e:
                    log.warning("rbd:%s: releasing the exclusive lock: %s", self.spec, e)
                self.locked = False
            self.image.close()
        finally:
            try:
                self._ioctx.close()
            finally:
                self._cluster.shutdown()


@dataclass(slots=True)
class _Request:
    """One operation in flight: what the I/O thread needs when it reaps it."""

    token: object
    op: int
    length: int
    bufs: list[memoryview] | None = None
    data: bytes | None = None  # a READ's result, filled in by librbd's callback
    payload: bytes | None = None  # a WRITE's joined buffers, alive until it completes


class RbdQueue:
    """One virtqueue's path to an image: librbd aio calls, completions via a CompletionChannel.

    ``image`` is an ``rbd.Image`` or anything with its ``aio_*`` methods
    (tests use a fake). Used on one I/O thread; the callbacks run on
    librbd's threads and only touch the channel.
    """

    def __init__(self, image: Any, depth: int) -> None:
        self._image = image
        self._depth = depth
        self._chan = CompletionChannel()
        self.fd: int | None = self._chan.fd
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    def submit(
        self,
        op: int,
        offset: int,
        length: int,
        bufs: list[memoryview],
        flags: int,
        token: object,
    ) -> None:
        req = _Request(token, op, length)
        chan = self._chan
        self._inflight += 1

        def done(completion: Any, data: bytes | None = None) -> None:
            # On a librbd thread: record, hand over; never touch guest memory here.
            ret = completion.get_return_value()
            if op == Op.READ and ret >= 0:
                req.data = data if data is not None else b""
            chan.put(req, ret)

        image = self._image
        try:
            if op == Op.READ:
                req.bufs = bufs
                image.aio_read(offset, length, done)
            elif op == Op.WRITE:
                req.payload = bufs[0].tobytes() if len(bufs) == 1 else b"".join(bufs)
                image.aio_write(req.payload, offset, done)
            elif op == Op.FLUSH:
                image.aio_flush(done)
            elif op == Op.DISCARD:
                image.aio_discard(offset, length, done)
            elif op == Op.WRITE_ZEROES:
                zflags = 0 if flags & FLAG_UNMAP else THICK_PROVISION
                image.aio_write_zeroes(offset, length, done, zero_flags=zflags)
            else:
                chan.put(req, -errno.EOPNOTSUPP)
        except Exception as e:
            # Refused before it started (a closed image, bad range): it still completes once.
            log.debug("rbd op %d at %d+%d refused: %s", op, offset, length, e)
            chan.put(req, -_errno(e))

    def commit(self) -> None:
        """Nothing to do: each aio call is already on its way to the OSDs."""

    def reap(self) -> list[Completion]:
        out: list[Completion] = []
        for req_obj, ret in self._chan.take():
            assert isinstance(req_obj, _Request)
            req = req_obj
            self._inflight -= 1
            if ret < 0:
                out.append((req.token, ret))
            elif req.op == Op.READ:
                out.append((req.token, _scatter(req.data or b"", req.bufs or [])))
            elif req.op == Op.WRITE:
                out.append((req.token, req.length))
            else:
                out.append((req.token, 0))
        return out

    def ready(self) -> bool:
        return self._chan.ready()

    def clear_signal(self) -> None:
        self._chan.clear()

    def close(self) -> None:
        """Stop taking completions: any that librbd still delivers are dropped."""
        self._chan.close()
        self.fd = None


def _scatter(data: bytes, bufs: list[memoryview]) -> int:
    """Copy a read's bytes into the guest's buffers; the bytes moved."""
    pos = 0
    total = len(data)
    for buf in bufs:
        n = min(len(buf), total - pos)
        if n <= 0:
            break
        buf[:n] = data[pos : pos + n]
        pos += n
    return pos
