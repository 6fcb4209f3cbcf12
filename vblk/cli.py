"""The ``vblk`` command line: ``serve``, ``info`` and ``bench``.

Bad input ends with one ``vblk: error: ...`` line on stderr and a non-zero
exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

from vblk import __version__
from vblk.blk.config import DEFAULT_NUM_QUEUES, MAX_NUM_QUEUES
from vblk.errors import VblkError

log = logging.getLogger("vblk")


class UsageError(VblkError):
    """The command line asks for something impossible."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, with a hint instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def queue_size_arg(text: str) -> int:
    """An argparse type: a split-ring size (a power of two in 1..32768), else a one-line error."""
    from vblk.virtio.defs import MAX_QUEUE_SIZE, is_queue_size

    value = _positive_int(text)
    if not is_queue_size(value):
        raise argparse.ArgumentTypeError(
            f"must be a power of two up to {MAX_QUEUE_SIZE}, got {value}"
        )
    return value


def _int_between(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi], else a one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def positive_float_upto(hi: float, unit: str = "") -> Callable[[str], float]:
    """An argparse type: a number in (0, hi] (NaN refused), else a one-line error."""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= hi:
            raise argparse.ArgumentTypeError(f"must be in (0, {hi:g}]{suffix}, got {text}")
        return value

    return parse


_poll_us = _int_between(0, 1_000_000)
_coalesce_us = _int_between(0, 100_000)
_thread_count = _int_between(1, 256)
_stage_sample = _int_between(0, 1 << 20)


def _socket_mode(text: str) -> int:
    """An octal permission mode such as 0660 (a leading 0o is accepted too)."""
    digits = text.strip().lower().removeprefix("0o")
    if not digits or digits.strip("01234567"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600")
    value = int(digits, 8)
    if value > 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode in 0000..0777")
    return value


def _size(text: str) -> int:
    from vblk.io.image import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _opt(text: str) -> tuple[str, str]:
    from vblk.storage.spec import parse_opt

    try:
        return parse_opt(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from vblk.io.engines import ENGINES
    from vblk.stats.stages import DEFAULT_SAMPLE_EVERY
    from vblk.virtio.coalesce import DEFAULT_HOLD_US
    from vblk.virtio.defs import MAX_QUEUE_SIZE

    parser = _Parser(prog="vblk", description="The virtio-blk I/O stack in Python.")
    parser.add_argument("--version", action="version", version=f"vblk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve a storage spec as a vhost-user-blk device",
        description="Serve SPEC to a VM (QEMU vhost-user-blk-pci) over a unix socket. SPEC is "
        "a raw file or block device, an image in a format qemu-img knows (qcow2, vmdk, vhdx, "
        "...; detected from its header), nbd://HOST[:PORT]/EXPORT, "
        "nbd+unix:///EXPORT?socket=PATH, rbd:POOL/IMAGE, or python:FILE.py:CLASS.",
    )
    serve.add_argument(
        "spec",
        metavar="SPEC",
        help="what to serve: PATH, nbd://..., nbd+unix://..., rbd:..., python:FILE.py:CLASS",
    )
    serve.add_argument(
        "--opt",
        type=_opt,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the storage backend (repeatable; e.g. a plugin's keyword arguments)",
    )
    serve.add_argument(
        "--format",
        metavar="FMT",
        help="image format of PATH instead of detecting it from its header (raw forces raw)",
    )
    serve.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    serve.add_argument(
        "--socket-mode",
        type=_socket_mode,
        default=0o600,
        metavar="OCTAL",
        help="permission bits of the socket (default 0600: only its owner may connect)",
    )
    serve.add_argument(
        "--num-queues",
        type=_positive_int,
        default=DEFAULT_NUM_QUEUES,
        metavar="N",
        help=f"most queues the frontend may use (default {DEFAULT_NUM_QUEUES}: "
        "unused ones cost nothing)",
    )
    serve.add_argument(
        "--queue-size",
        type=queue_size_arg,
        default=MAX_QUEUE_SIZE,
        metavar="N",
        help=f"largest ring served (default {MAX_QUEUE_SIZE}, every size); below 128 it also "
        "lowers seg_max so that rings of N work without indirect descriptors",
    )
    serve.add_argument("--read-only", action="store_true", help="refuse writes (guest sees ro=1)")
    serve.add_argument("--serial", default="", metavar="ID", help="GET_ID answer, 20 bytes at most")
    serve.add_argument(
        "--create", type=_size, metavar="SIZE", help="create a sparse raw PATH of SIZE if missing"
    )
    serve.add_argument("--direct", action="store_true", help="open a raw PATH with O_DIRECT")
    serve.add_argument(
        "--aio",
        choices=ENGINES,
        help="I/O engine of a raw PATH: io_uring (batched submission; the default where the "
        "kernel allows it), threads (a preadv/pwritev pool; the default elsewhere), sync (on "
        "the queue thread, no overlap)",
    )
    serve.add_argument(
        "--io-threads",
        type=_thread_count,
        default=4,
        metavar="N",
        help="pool size per queue for --aio threads (default 4)",
    )
    serve.add_argument(
        "--queue-threads",
        type=_thread_count,
        default=1,
        metavar="N",
        help="threads serving the queues, queue i on thread i mod N, each with one poll loop "
        "over its queues (default 1: under one GIL, more threads only add hand-offs)",
    )
    serve.add_argument(
        "--poll-us",
        type=_poll_us,
        default=0,
        metavar="US",
        help="adaptive polling: watch the avail ring up to US microseconds before sleeping "
        "(default 0, off; costs CPU, pays off when the backend has a core to itself)",
    )
    serve.add_argument(
        "--coalesce-us",
        type=_coalesce_us,
        default=DEFAULT_HOLD_US,
        metavar="US",
        help="interrupt coalescing: let a completion's interrupt wait up to US microseconds "
        f"for more completions to share it, adaptively (default {DEFAULT_HOLD_US}; 0 signals "
        "each completion at once)",
    )
    serve.add_argument(
        "--stage-sample",
        type=_stage_sample,
        default=DEFAULT_SAMPLE_EVERY,
        metavar="N",
        help="per-stage latency timing of one request in N per queue "
        f"(default {DEFAULT_SAMPLE_EVERY}; 1 times every request, 0 none)",
    )
    serve.add_argument(
        "--control",
        metavar="PATH",
        help="also listen for vblk ctl on this control socket (the export's id is 'disk'; "
        "the disk is then served by a worker process the daemon restarts if it dies)",
    )
    from vblk.daemon import add_log_level_argument, add_metrics_argument

    add_metrics_argument(serve)
    add_log_level_argument(serve)
    serve.set_defaults(func=cmd_serve)

    from vblk import bench, info, top, trace

    info.add_parser(sub)
    bench.add_parser(sub)
    top.add_parser(sub)
    trace.add_parser(sub)
    from vblk import ctl, daemon

    daemon.add_parser(sub)
    ctl.add_parser(sub)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from vblk.blk.device import BlockDevice
    from vblk.server import GIL_SWITCH_INTERVAL, Server
    from vblk.storage.spec import open_storage
    from vblk.worker import NEVER_SAMPLE

    _setup_logging(args.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    if args.num_queues > MAX_NUM_QUEUES:
        raise UsageError(f"--num-queues {args.num_queues} exceeds {MAX_NUM_QUEUES}")
    if len(args.serial.encode()) > 20:
        raise UsageError(f"--serial {args.serial!r} is longer than 20 bytes")
    opts: dict[str, str] = {}
    for key, value in args.opt:
        if key in opts:
            raise UsageError(f"--opt {key} given twice")
        opts[key] = value
    if args.control or args.metrics:
        return _serve_as_daemon(args, opts)
    storage = open_storage(
        args.spec,
        opts=opts,
        read_only=args.read_only,
        direct=args.direct,
        fmt=args.format,
        aio=args.aio,
        io_threads=args.io_threads,
        create=args.create,
    )
    try:
        device = BlockDevice(
            storage,
            num_queues=args.num_queues,
            queue_size=args.queue_size,
            read_only=args.read_only,
            serial=args.serial,
        )
        server = Server(
            device,
            args.socket,
            num_queues=args.num_queues,
            poll_us=args.poll_us,
            threads=min(args.queue_threads, args.num_queues),
            coalesce_us=args.coalesce_us,
            socket_mode=args.socket_mode,
            sample_every=args.stage_sample or NEVER_SAMPLE,
        )
    except BaseException:
        storage.close()
        raise

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: finishing in-flight requests and shutting down", signal.Signals(signum).name)
        server.request_shutdown()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info(
        "serving %s (%d sectors%s) with %d queue(s) on %d thread(s), rings of up to %d "
        "entries, seg_max %d%s",
        storage.description,
        device.capacity,
        ", read-only" if device.read_only else "",
        args.num_queues,
        min(args.queue_threads, args.num_queues),
        args.queue_size,
        device.config.seg_max,
        (f", polling up to {args.poll_us} us" if args.poll_us else "")
        + (f", coalescing interrupts up to {args.coalesce_us} us" if args.coalesce_us else ""),
    )
    try:
        server.serve_forever()
    finally:
        device.close()
        storage.close()
    log.info("stopped")
    return 0


def _serve_as_daemon(args: argparse.Namespace, opts: dict[str, str]) -> int:
    """``vblk serve --control/--metrics``: a daemon with the one export ``disk``."""
    from vblk.daemon import run
    from vblk.worker import NEVER_SAMPLE

    params = {
        "id": "disk",
        "spec": args.spec,
        "socket": args.socket,
        "num_queues": args.num_queues,
        "queue_size": args.queue_size,
        "read_only": args.read_only,
        "serial": args.serial,
        "direct": args.direct,
        "aio": args.aio,
        "opts": opts,
        "format": args.format,
    }
    defaults = {
        "io_threads": args.io_threads,
        "poll_us": args.poll_us,
        "queue_threads": args.queue_threads,
        "coalesce_us": args.coalesce_us,
        "sample_every": args.stage_sample or NEVER_SAMPLE,
        "create": args.create,
    }
    return run(
        args.control,
        exports=[(params, None)],
        metrics=args.metrics,
        log_level=args.log_level,
        defaults=defaults,
        socket_mode=args.socket_mode,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except VblkError as e:
        print(f"vblk: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `vblk info | head`: the reader left; say nothing more, like other CLI tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
