"""One export: a device on its own vhost-user socket, served in a worker process.

The daemon (:mod:`vblk.daemon`) binds the export's socket and starts
:func:`worker_main` in a process of its own, handing it the listening socket
and one end of a pipe. The worker opens the storage, serves frontends on
that socket with a :class:`~vblk.server.Server`, and answers the daemon's
commands on the pipe from a thread of its own: ``stats``, ``resize``,
``qos`` and ``stop``. Each export thus has its own GIL and its own crash
domain: a frontend that makes its worker die (SIGBUS from memory shrunk
under it) costs that export a restart, no more.

Commands are tuples; answers are ``("ok", result)`` or ``("err", code,
message)`` with a JSON-RPC code (:mod:`vblk.control.jsonrpc`).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from socket import socket
from typing import Any

from vblk.control import jsonrpc as rpc
from vblk.procname import set_thread_name
from vblk.qos import Limits, Throttle
from vblk.stats.stages import DEFAULT_SAMPLE_EVERY
from vblk.virtio.coalesce import DEFAULT_HOLD_US

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """Everything a worker needs to serve one export (picklable)."""

    id: str
    spec: str
    socket: str
    num_queues: int = 1
    queue_size: int = 256
    read_only: bool = False
    serial: str = ""
    direct: bool = False
    aio: str | None = None
    opts: dict[str, Any] = field(default_factory=dict)
    format: str | None = None
    create: int | None = None  # vblk serve --create: a missing raw file is made this size
    io_threads: int = 4
    poll_us: int = 0
    queue_threads: int = 1
    coalesce_us: int = DEFAULT_HOLD_US
    sample_every: int = DEFAULT_SAMPLE_EVERY  # stage timing of one request in N
    log_level: str = "info"

    def public(self) -> dict[str, Any]:
        """The export-add parameters, as export-list shows them."""
        return {
            "id": self.id,
            "spec": self.spec,
            "socket": self.socket,
            "num_queues": self.num_queues,
            "queue_size": self.queue_size,
            "read_only": self.read_only,
            "serial": self.serial,
            "direct": self.direct,
            "aio": self.aio,
            "opts": dict(self.opts),
            "format": self.format,
        }


class ExportError(Exception):
    """A command failed; carries the JSON-RPC code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def setup_logging(level: str, export_id: str | None) -> None:
    where = f" [{export_id}]" if export_id else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def worker_main(cfg: ExportConfig, listener: socket, conn: Connection, limits: Limits) -> None:
    """The worker process: open, answer ``ready`` (or the error), serve until ``stop``."""
    from vblk.server import GIL_SWITCH_INTERVAL

    set_thread_name(f"vblk-{cfg.id}")
    setup_logging(cfg.log_level, cfg.id)
    # The daemon handles the signals; a terminal's ^C reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        export = _Export(cfg, listener, limits)
    except ExportError as e:
        conn.send(("err", e.code, e.message))
        return
    except Exception as e:  # a bug while opening must reach the caller as an error
        log.exception("cannot start the export")
        conn.send(("err", rpc.INTERNAL_ERROR, f"cannot start the export: {e}"))
        return
    conn.send(("ok", {"size": export.size}))
    commands = threading.Thread(
        target=export.commands, args=(conn,), name=f"{cfg.id}-ctl", daemon=True
    )
    commands.start()
    export.server.serve_forever()
    export.close()
    log.info("stopped")
    try:
        conn.send(("ok", None))  # the answer to stop
    except OSError:
        pass


def storage_opts(opts: dict[str, Any]) -> dict[str, str]:
    """export-add's opts as ``--opt KEY=VALUE`` gives them: JSON numbers and booleans as text."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in opts.items()}


class _Export:
    """The worker's state: storage, device, server, rate limits."""

    def __init__(self, cfg: ExportConfig, listener: socket, limits: Limits) -> None:
        from vblk.blk.device import BlockDevice
        from vblk.server import Server
        from vblk.storage.base import StorageError
        from vblk.storage.spec import open_storage

        self.cfg = cfg
        try:
            self.storage = open_storage(
                cfg.spec,
                opts=storage_opts(cfg.opts),
                read_only=cfg.read_only,
                direct=cfg.direct,
                fmt=cfg.format,
                aio=cfg.aio,
                io_threads=cfg.io_threads,
                create=cfg.create,
            )
        except StorageError as e:
            raise ExportError(rpc.STORAGE_ERROR, str(e)) from None
        try:
            self.device = BlockDevice(
                self.storage,
                num_queues=cfg.num_queues,
                queue_size=cfg.queue_size,
                read_only=cfg.read_only,
                serial=cfg.serial,
            )
            self.server = Server(
                self.device,
                cfg.socket,
                num_queues=cfg.num_queues,
                poll_us=cfg.poll_us,
                threads=min(cfg.queue_threads, cfg.num_queues),
                coalesce_us=cfg.coalesce_us,
                sample_every=cfg.sample_every,
                listener=listener,
                label=cfg.id,
            )
        except BaseException:
            self.storage.close()
            raise
        self.set_qos(limits)
        log.info(
            "serving %s (%d bytes%s) on %s with %d queue(s)",
            self.storage.description,
            self.size,
            ", read-only" if self.device.read_only else "",
            cfg.socket,
            cfg.num_queues,
        )

    @property
    def size(self) -> int:
        return self.device.capacity << 9

    def commands(self, conn: Connection) -> None:
        """Answer the daemon's commands until it says stop or goes away."""
        set_thread_name(f"{self.cfg.id}-ctl")
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                log.warning("the daemon went away; stopping")
                self.server.request_shutdown()
                return
            if not isinstance(cmd, tuple) or not cmd:
                continue
            if cmd[0] == "stop":
                self.server.request_shutdown()
                return  # serve_forever returns and worker_main answers
            try:
                conn.send(("ok", self.command(cmd)))
            except ExportError as e:
                conn.send(("err", e.code, e.message))
            except Exception as e:
                log.exception("command %s failed", cmd[0])
                conn.send(("err", rpc.INTERNAL_ERROR, f"{cmd[0]}: {e}"))

    def command(self, cmd: tuple[Any, ...]) -> Any:
        name = cmd[0]
        if name == "stats":
            return {
                "attached": self.server.attached,
                "size": self.size,
                "queues": self.server.snapshot(),
            }
        if name == "resize":
            return self.resize(int(cmd[1]), bool(cmd[2]))
        if name == "qos":
            self.set_qos(Limits(**cmd[1]))
            return None
        if name == "trace":
            return self.trace(float(cmd[1]), float(cmd[2]))
        raise ExportError(rpc.INTERNAL_ERROR, f"unknown worker command {name!r}")

    def trace(self, duration: float, fraction: float) -> dict[str, Any]:
        """export-trace: every running queue records its requests for ``duration`` seconds."""
        from vblk.stats.tracing import run_trace

        queues = self.server.queues
        workers = sorted(
            (w for w, _ in list(queues.workers.values())) if queues is not None else [],
            key=lambda w: w.index,
        )
        if not workers:
            raise ExportError(rpc.EXPORT_FAILED, f"{self.cfg.id}: no queue is running to trace")
        try:
            return run_trace(
                [(w.index, w.stages) for w in workers],
                duration,
                fraction,
                lambda: sum(w.stats.requests for w in workers),
            )
        except ValueError as e:
            raise ExportError(rpc.INVALID_PARAMS, f"invalid params: {e}") from None

    def set_qos(self, limits: Limits) -> None:
        import time

        throttle = None if limits.unlimited else Throttle(limits, time.monotonic_ns())
        self.server.set_throttle(throttle)

    def resize(self, size: int, force: bool) -> dict[str, Any]:
        """Grow (or, with force, shrink) the storage and tell an attached guest."""
        from vblk.storage.base import StorageError

        old = self.size
        if size < old and not force:
            raise ExportError(
                rpc.RESIZE_REFUSED,
                f"{self.cfg.id}: shrinking from {old} to {size} bytes loses data; "
                "pass force=true to do it anyway",
            )
        if self.device.read_only:
            raise ExportError(rpc.RESIZE_REFUSED, f"{self.cfg.id}: the export is read-only")
        if size != old:
            try:
                caps = self.storage.resize(size)
            except StorageError as e:
                raise ExportError(rpc.RESIZE_REFUSED, f"{self.cfg.id}: {e}") from None
            self.device.resized(caps)
        told = False
        try:
            told = self.server.config_changed()
        except (OSError, Exception) as e:
            log.warning("resized, but the frontend was not told: %s", e)
        log.info("resized from %d to %d bytes%s", old, size, "; guest told" if told else "")
        return {"id": self.cfg.id, "old_size": old, "size": size, "guest_notified": told}

    def close(self) -> None:
        self.device.close()
        self.storage.close()
