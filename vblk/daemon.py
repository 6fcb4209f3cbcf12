"""``vblk daemon``: many exports under one process tree, driven over a control socket.

The daemon owns the control socket (JSON-RPC 2.0, one object per line, see
:mod:`vblk.control`), the metrics endpoint, the signals and the supervision
of its exports. Each export (:mod:`vblk.export`) runs in a worker process
of its own, started with the ``spawn`` method: its own GIL, its own crash
domain. The daemon binds each export's vhost-user socket itself and hands
the listening socket to the worker, so the path stays valid while a dead
worker is replaced: QEMU reconnects to the same path, and the new worker
resubmits the in-flight requests from the inflight region QEMU kept.

Control clients are untrusted: a line is capped at :data:`MAX_LINE` bytes,
half a message must be finished within :data:`MESSAGE_TIMEOUT`, an idle
client is dropped after :data:`IDLE_TIMEOUT`, at most :data:`MAX_CLIENTS`
are served at once, and every error is an answer (or a disconnect), never
a disturbance of the daemon or its exports.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from vblk.control import jsonrpc as rpc
from vblk.control.methods import validate
from vblk.errors import VblkError
from vblk.export import ExportConfig, worker_main
from vblk.qos import Limits
from vblk.server import ServeError, Server, remove_socket, socket_identity

log = logging.getLogger(__name__)

#: The longest request line accepted.
MAX_LINE = 1 << 20
#: A client that starts a line must finish it within this time (seconds; the environment
#: variable VBLK_CONTROL_MESSAGE_TIMEOUT overrides it, for tests that wait for the drop).
MESSAGE_TIMEOUT = 10.0
#: A client that sends nothing for this long is disconnected.
IDLE_TIMEOUT = 600.0
#: A client that does not read its answers for this long is disconnected.
WRITE_TIMEOUT = 10.0
#: Control connections served at once; more are answered with an error and closed.
MAX_CLIENTS = 128
#: How long a worker may take to open its storage and say it is ready.
START_TIMEOUT = 60.0
#: How long a worker may take to answer a command (stats, resize, qos).
COMMAND_TIMEOUT = 30.0
#: How long a stopping worker may take to finish its in-flight requests.
STOP_TIMEOUT = 75.0
#: Restarts of a worker are spaced at least this far apart.
RESTART_DELAY = 0.5

_ctx = multiprocessing.get_context("spawn")


class DaemonError(VblkError):
    """The daemon cannot start as asked."""


@dataclass
class _Handle:
    """The daemon's view of one export."""

    cfg: ExportConfig
    listener: socket.socket
    identity: tuple[int, int]
    limits: Limits = field(default_factory=Limits)
    process: Any = None  # a multiprocessing Process
    conn: Connection | None = None
    state: str = "stopped"  # running | restarting | stopped
    restarts: int = 0
    size: int = 0
    removing: bool = False
    started_at: float = 0.0
    #: Commands whose answer did not come in time: answers arrive in order, so the next
    #: this many answers on ``conn`` are theirs, never the answer to a later command.
    unanswered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment; ``default`` if unset or not one."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        log.warning("%s=%r is not a number of seconds in (0, 3600]; using %g", name, text, default)
        return default
    return value


class Daemon:
    """The control socket, the exports' workers, and their supervision."""

    def __init__(
        self,
        control_path: str | None,
        *,
        log_level: str = "info",
        defaults: dict[str, Any] | None = None,
        socket_mode: int = 0o600,
    ) -> None:
        self.control_path = control_path
        self.log_level = log_level
        self.defaults = defaults or {}  # serve-level settings for every export
        self.socket_mode = socket_mode  # of the exports' sockets
        self.message_timeout = _env_seconds("VBLK_CONTROL_MESSAGE_TIMEOUT", MESSAGE_TIMEOUT)
        self.exports: dict[str, _Handle] = {}
        self._lock = threading.Lock()  # export-add and export-remove, one at a time
        self._shutdown = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self.listener: socket.socket | None = None
        self._identity = (0, 0)
        if control_path is not None:
            try:
                self.listener = Server.bind(control_path, 0o600)
            except ServeError as e:
                raise DaemonError(f"control {e}") from None
            self.listener.listen(MAX_CLIENTS)  # a burst of clients queues, never EAGAIN
            self._identity = socket_identity(control_path)
        #: Methods by name: each takes checked params and returns a JSON-able result.
        self.methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            "export-add": self.export_add,
            "export-remove": self.export_remove,
            "export-list": self.export_list,
            "export-stats": self.export_stats,
            "export-resize": self.export_resize,
            "export-set-qos": self.export_set_qos,
            "export-trace": self.export_trace,
            "daemon-shutdown": self.daemon_shutdown,
        }

    # -- life cycle -------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Async-signal-safe: ask serve_forever to stop every export and return."""
        self._shutdown = True
        os.eventfd_write(self._wake, 1)

    def serve_forever(self) -> None:
        threads = [threading.Thread(target=self._supervise, name="vblk-supervise", daemon=True)]
        if self.listener is not None:
            threads.append(
                threading.Thread(target=self._accept_loop, name="vblk-control", daemon=True)
            )
        for t in threads:
            t.start()
        log.info("control socket %s", self.control_path)
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        while not self._shutdown:
            try:
                poller.poll()
            except InterruptedError:
                continue
        log.info("shutting down: stopping %d export(s)", len(self.exports))
        for export_id in list(self.exports):
            try:
                self.export_remove({"id": export_id})
            except rpc.RpcError as e:
                log.error("%s", e.message)
        if self.listener is not None and self.control_path is not None:
            self.listener.close()
            remove_socket(self.control_path, self._identity)
        for t in threads:
            t.join(2)

    # -- control connections ----------------------------------------------------

    def _accept_loop(self) -> None:
        assert self.listener is not None
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while not self._shutdown:
            try:
                poller.poll()
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if self._shutdown:
                    return
                log.error("control: accept failed: %s", e)
                time.sleep(0.1)
                continue
            if not self._clients.acquire(blocking=False):
                log.warning("control: refusing a client: %d connections already", MAX_CLIENTS)
                try:
                    conn.settimeout(1)
                    conn.sendall(
                        rpc.error_line(rpc.RpcError(rpc.INTERNAL_ERROR, "too many clients"))
                    )
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(
                target=self._client, args=(conn,), name="vblk-control-client", daemon=True
            ).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            self._serve_client(conn)
        except OSError as e:
            log.info("control client dropped: %s", e)
        except Exception:
            log.exception("control client dropped after an internal error")
        finally:
            conn.close()
            self._clients.release()

    def _serve_client(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        buf = bytearray()
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while not self._shutdown:
            timeout = self.message_timeout if buf else IDLE_TIMEOUT
            deadline = time.monotonic() + timeout
            ready = False
            while not ready and not self._shutdown:
                ms = int((deadline - time.monotonic()) * 1000)
                if ms <= 0:
                    log.info(
                        "control client dropped: %s",
                        f"half a message for {timeout:.0f}s" if buf else f"idle {timeout:.0f}s",
                    )
                    return
                ready = any(fd == conn.fileno() for fd, _ in poller.poll(ms))
            if not ready:
                return
            data = conn.recv(1 << 16)
            if not data:
                return
            buf += data
            while (nl := buf.find(b"\n")) >= 0:
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if line.strip():
                    answer = self.handle_line(line)
                    if answer is not None:
                        conn.settimeout(WRITE_TIMEOUT)
                        conn.sendall(answer)
                        conn.settimeout(None)
            if len(buf) > MAX_LINE:
                err = rpc.RpcError(rpc.PARSE_ERROR, f"request line longer than {MAX_LINE} bytes")
                conn.settimeout(WRITE_TIMEOUT)
                conn.sendall(rpc.error_line(err))
                log.warning("control client dropped: a line longer than %d bytes", MAX_LINE)
                return

    def handle_line(self, line: bytes) -> bytes | None:
        """The answer to one request line (None for a notification)."""
        call = rpc.parse_line(line)
        if isinstance(call, rpc.RpcError):
            return rpc.error_line(call)
        try:
            params = validate(call.method, call.params)
            result = self.methods[call.method](params)
        except rpc.RpcError as e:
            if call.notification:
                return None
            e.request_id = call.request_id
            return rpc.error_line(e)
        except Exception as e:
            log.exception("%s failed", call.method)
            err = rpc.RpcError(rpc.INTERNAL_ERROR, f"{call.method}: internal error: {e}")
            err.request_id = call.request_id
            return None if call.notification else rpc.error_line(err)
        return None if call.notification else rpc.result_line(call.request_id, result)

    # -- methods ----------------------------------------------------------------

    def _get(self, export_id: str) -> _Handle:
        handle = self.exports.get(export_id)
        if handle is None:
            raise rpc.RpcError(rpc.EXPORT_NOT_FOUND, f"no export with id {export_id!r}")
        return handle

    def export_add(self, p: dict[str, Any]) -> dict[str, Any]:
        cfg = ExportConfig(**p, **self.defaults, log_level=self.log_level)
        path = os.path.abspath(cfg.socket)
        cfg = replace(cfg, socket=path)
        with self._lock:
            if self._shutdown:
                raise rpc.RpcError(rpc.EXPORT_FAILED, "the daemon is shutting down")
            if cfg.id in self.exports:
                raise rpc.RpcError(rpc.EXPORT_EXISTS, f"export {cfg.id!r} already exists")
            for other in self.exports.values():
                if other.cfg.socket == path:
                    raise rpc.RpcError(
                        rpc.SOCKET_IN_USE, f"socket {path}: in use by export {other.cfg.id!r}"
                    )
            try:
                listener = Server.bind(path, self.socket_mode)
            except ServeError as e:
                raise rpc.RpcError(rpc.SOCKET_IN_USE, str(e)) from None
            handle = _Handle(cfg, listener, socket_identity(path))
            try:
                self._start(handle)
            except rpc.RpcError:
                listener.close()
                remove_socket(path, handle.identity)
                raise
            self.exports[cfg.id] = handle
        log.info("export %s added: %s on %s", cfg.id, cfg.spec, path)
        return self._describe(handle)

    def _start(self, handle: _Handle) -> None:
        """Start the worker and wait until it serves (RpcError if it cannot)."""
        parent, child = _ctx.Pipe()
        proc = _ctx.Process(
            target=worker_main,
            args=(handle.cfg, handle.listener, child, handle.limits),
            name=f"vblk-{handle.cfg.id}",
        )
        try:
            proc.start()
        except OSError as e:
            parent.close()
            raise rpc.RpcError(
                rpc.EXPORT_FAILED, f"export {handle.cfg.id!r}: cannot start a worker: {e}"
            ) from None
        finally:
            child.close()
        answer: Any = None
        try:
            if parent.poll(START_TIMEOUT):
                answer = parent.recv()
        except (EOFError, OSError):
            answer = None
        if not (isinstance(answer, tuple) and answer and answer[0] == "ok"):
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            parent.close()
            if isinstance(answer, tuple) and len(answer) == 3:
                raise rpc.RpcError(int(answer[1]), str(answer[2]))
            raise rpc.RpcError(
                rpc.EXPORT_FAILED,
                f"export {handle.cfg.id!r}: the worker died while starting (exit {proc.exitcode})",
            )
        handle.process, handle.conn = proc, parent
        handle.unanswered = 0
        handle.size = int(answer[1]["size"])
        handle.state = "running"
        handle.started_at = time.monotonic()

    def export_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            handle = self._get(p["id"])
            handle.removing = True
            with handle.lock:
                self._stop(handle)
            handle.listener.close()
            remove_socket(handle.cfg.socket, handle.identity)
            del self.exports[handle.cfg.id]
        log.info("export %s removed", handle.cfg.id)
        return {"id": handle.cfg.id}

    def _stop(self, handle: _Handle) -> None:
        proc, conn = handle.process, handle.conn
        handle.state = "stopped"
        if proc is None or conn is None:
            return
        try:
            conn.send(("stop",))
            _answer(handle, conn, STOP_TIMEOUT)
        except (OSError, EOFError):
            pass
        proc.join(5)
        if proc.is_alive():
            log.error("export %s: the worker did not stop; killing it", handle.cfg.id)
            proc.kill()
            proc.join()
        conn.close()
        handle.process = handle.conn = None

    def export_list(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        return [self._describe(h) for h in list(self.exports.values())]

    def _describe(self, handle: _Handle) -> dict[str, Any]:
        proc = handle.process
        return {
            **handle.cfg.public(),
            "state": handle.state,
            "pid": proc.pid if proc is not None and handle.state == "running" else None,
            "restarts": handle.restarts,
            "size": handle.size,
            "qos": _qos_dict(handle.limits),
        }

    def _call(self, handle: _Handle, cmd: tuple[Any, ...], timeout: float = COMMAND_TIMEOUT) -> Any:
        """One command to the export's worker and its answer (RpcError on failure)."""
        name = handle.cfg.id
        if not handle.lock.acquire(timeout=COMMAND_TIMEOUT):
            raise rpc.RpcError(rpc.EXPORT_FAILED, f"export {name!r} is busy")
        try:
            conn = handle.conn
            if handle.state != "running" or conn is None:
                raise rpc.RpcError(rpc.EXPORT_FAILED, f"export {name!r} is {handle.state}")
            try:
                conn.send(cmd)
                answer = _answer(handle, conn, timeout)
                if answer is None:
                    raise rpc.RpcError(rpc.EXPORT_FAILED, f"export {name!r} did not answer")
            except (OSError, EOFError):
                raise rpc.RpcError(
                    rpc.EXPORT_FAILED, f"export {name!r}: its worker died (it is restarted)"
                ) from None
        finally:
            handle.lock.release()
        if answer[0] == "ok":
            return answer[1]
        raise rpc.RpcError(int(answer[1]), str(answer[2]))

    def export_stats(self, p: dict[str, Any]) -> dict[str, Any]:
        handles = [self._get(p["id"])] if "id" in p else list(self.exports.values())
        return {"exports": [self._stats(h) for h in handles]}

    def _stats(self, handle: _Handle) -> dict[str, Any]:
        out = self._describe(handle)
        state = handle.state
        queues: list[dict[str, Any]] = []
        if state == "running":
            try:
                snap = self._call(handle, ("stats",))
                queues = snap["queues"]
                state = "attached" if snap["attached"] else "listening"
                handle.size = out["size"] = snap["size"]
            except rpc.RpcError:
                state = "restarting"
        out["state"] = state
        out["queues"] = queues
        out["total"] = total_of(queues)
        return out

    def export_resize(self, p: dict[str, Any]) -> dict[str, Any]:
        handle = self._get(p["id"])
        result: dict[str, Any] = self._call(handle, ("resize", p["size"], p["force"]))
        handle.size = result["size"]
        return result

    def export_set_qos(self, p: dict[str, Any]) -> dict[str, Any]:
        handle = self._get(p["id"])
        current = _qos_dict(handle.limits)
        current.update({k: v for k, v in p.items() if k != "id"})
        limits = Limits(**current)
        self._call(handle, ("qos", _qos_dict(limits)))
        handle.limits = limits
        log.info("export %s: qos %s", handle.cfg.id, _qos_dict(limits))
        return {"id": handle.cfg.id, "qos": _qos_dict(limits)}

    def export_trace(self, p: dict[str, Any]) -> dict[str, Any]:
        """Trace the export's requests, in its own process (the export's other commands wait)."""
        from vblk.stats.tracing import BASELINE_S

        handle = self._get(p["id"])
        wait = p["duration"] + BASELINE_S + COMMAND_TIMEOUT
        result: dict[str, Any] = self._call(
            handle, ("trace", p["duration"], p["sample"]), timeout=wait
        )
        return result

    def daemon_shutdown(self, p: dict[str, Any]) -> dict[str, Any]:
        self.request_shutdown()
        return {}

    # -- supervision ------------------------------------------------------------

    def _supervise(self) -> None:
        """Restart the workers that die; never the ones being removed."""
        while not self._shutdown:
            procs = [h.process for h in list(self.exports.values())]
            sentinels = [p.sentinel for p in procs if p is not None]
            waiting = [h for h in list(self.exports.values()) if h.state == "restarting"]
            try:
                multiprocessing.connection.wait([*sentinels, self._wake], 0.5 if waiting else 2)
            except OSError:
                time.sleep(0.1)
            for h in list(self.exports.values()):
                if self._shutdown or h.removing:
                    continue
                proc = h.process
                if h.state == "running" and proc is not None and not proc.is_alive():
                    self._restart(h)
                elif h.state == "restarting":
                    self._restart(h)

    def _restart(self, handle: _Handle) -> None:
        if not handle.lock.acquire(blocking=False):
            return
        try:
            if handle.removing:
                return
            proc = handle.process
            if proc is not None:
                log.error(
                    "export %s: worker %d died (exit %s); restarting",
                    handle.cfg.id,
                    proc.pid,
                    proc.exitcode,
                )
                if handle.conn is not None:
                    handle.conn.close()
                handle.process = handle.conn = None
                handle.restarts += 1
                handle.state = "restarting"
            wait = handle.started_at + RESTART_DELAY - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                self._start(handle)
                log.info("export %s: worker restarted", handle.cfg.id)
            except rpc.RpcError as e:
                handle.started_at = time.monotonic() + 2  # try again later
                log.error("export %s: restart failed: %s", handle.cfg.id, e.message)
        finally:
            handle.lock.release()


def _answer(handle: _Handle, conn: Connection, timeout: float) -> Any:
    """The worker's answer to the command just sent, or None if it takes over ``timeout``.

    The late answers of earlier commands that timed out are read and dropped first.
    """
    deadline = time.monotonic() + timeout
    while conn.poll(max(0.0, deadline - time.monotonic())):
        answer = conn.recv()
        if handle.unanswered == 0:
            return answer
        handle.unanswered -= 1
    handle.unanswered += 1
    return None


def _qos_dict(limits: Limits) -> dict[str, Any]:
    return limits.as_dict()


#: Per-queue counters summed into an export's total.
COUNTERS = (
    "requests",
    "read_ops",
    "write_ops",
    "read_bytes",
    "write_bytes",
    "flushes",
    "discards",
    "write_zeroes",
    "errors",
    "kicks",
    "interrupts",
    "inflight",
    "held",
)


def total_of(queues: list[dict[str, Any]]) -> dict[str, Any]:
    """An export's counters summed over its queues, with the stage histograms merged."""
    total: dict[str, Any] = {k: sum(int(q.get(k, 0)) for q in queues) for k in COUNTERS}
    stages: dict[str, list[Any]] = {}
    for q in queues:
        for name, snap in q.get("stages", {}).items():
            stages.setdefault(name, []).append(snap)
    if stages:
        from vblk.stats.histogram import merge_snapshots

        total["stages"] = {name: merge_snapshots(snaps) for name, snaps in stages.items()}
    else:
        total["stages"] = {}
    return total


# -- the command line -------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "daemon",
        help="serve many exports, driven over a JSON-RPC control socket",
        description="Run the vblk storage daemon: exports from --config and export-add, "
        "each in its own worker process, controlled over --control (see vblk ctl).",
    )
    p.add_argument("--control", required=True, metavar="PATH", help="control socket (mode 0600)")
    p.add_argument("--config", metavar="FILE", help="TOML file listing the exports to start with")
    add_metrics_argument(p)
    add_log_level_argument(p)
    p.set_defaults(func=cmd_daemon)


def add_metrics_argument(p: Any) -> None:
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )


def add_log_level_argument(p: Any) -> None:
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default info)",
    )


def run(
    control: str | None,
    *,
    exports: list[tuple[dict[str, Any], dict[str, Any] | None]],
    metrics: str | None,
    log_level: str,
    defaults: dict[str, Any] | None = None,
    socket_mode: int = 0o600,
) -> int:
    """Start the daemon with ``exports``, serve until a signal or daemon-shutdown."""
    import signal

    from vblk.export import setup_logging

    setup_logging(log_level, None)
    daemon = Daemon(control, log_level=log_level, defaults=defaults, socket_mode=socket_mode)
    metrics_server = None
    try:
        if metrics:
            from vblk.metrics import MetricsServer

            metrics_server = MetricsServer(metrics, lambda: daemon.export_stats({}))
            metrics_server.start()
        for params, qos in exports:
            try:
                daemon.export_add(params)
                if qos is not None:
                    daemon.export_set_qos(qos)
            except rpc.RpcError as e:
                raise DaemonError(f"export {params['id']}: {e.message}") from None

        def on_signal(signum: int, frame: object) -> None:
            daemon.request_shutdown()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        daemon.serve_forever()
    except BaseException:
        daemon.request_shutdown()
        daemon.serve_forever()  # stops what was started, removes the sockets
        raise
    finally:
        if metrics_server is not None:
            metrics_server.stop()
    log.info("stopped")
    return 0


def cmd_daemon(args: Any) -> int:
    from vblk.control.config import parse_config

    exports: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DaemonError(f"config {args.config}: {e.strerror}") from None
        exports = parse_config(text)
    return run(args.control, exports=exports, metrics=args.metrics, log_level=args.log_level)
