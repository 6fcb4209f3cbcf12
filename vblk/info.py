"""``vblk info``: connect to a vhost-user-blk backend and describe it.

A quick way to see what a backend offers and what the driver negotiated,
before pointing a VM (or ``vblk bench``) at it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="describe a vhost-user-blk backend",
        description="Connect to the backend at --socket, negotiate, print features, "
        "config space and serial, then disconnect.",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="backend's unix socket")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="reply timeout (default 10)"
    )
    p.add_argument(
        "--num-queues", type=int, default=1, metavar="N", help="queues to start (default 1)"
    )
    p.set_defaults(func=cmd_info)


def gather(path: str, *, timeout: float = 10.0, num_queues: int = 1) -> dict[str, Any]:
    """Connect, collect what ``info`` shows, disconnect."""
    from vblk.client import VirtioBlkError, connect

    with connect(path, num_queues=num_queues, timeout=timeout, mem_size=1 << 20) as dev:
        data = dev.info()
        try:
            data["serial"] = dev.get_id()
        except VirtioBlkError as e:
            data["serial"] = None
            data["serial_error"] = str(e)
    return data


def format_text(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [
        f"socket:            {data['socket']}",
        f"capacity:          {data['capacity']} bytes ({data['sectors']} sectors, "
        f"{_human(data['capacity'])})",
        f"block size:        {data['block_size']}",
        f"read-only:         {'yes' if data['read_only'] else 'no'}",
        f"serial:            {data['serial']!r}"
        + (f" ({data['serial_error']})" if data.get("serial_error") else ""),
        f"queues:            {data['num_queues']} started, {data['max_queues']} offered, "
        f"size {data['queue_size']}",
        f"features:          {' '.join(data['features'])}",
        f"device offers:     {' '.join(data['device_features'])}",
        f"protocol features: {' '.join(data['protocol_features'])}",
        f"device offers:     {' '.join(data['device_protocol_features'])}",
        "config space:",
    ]
    width = max(len(k) for k in cfg)
    lines += [f"  {k:<{width}}  {v}" for k, v in cfg.items()]
    return "\n".join(lines)


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.4g} {unit}"


def cmd_info(args: argparse.Namespace) -> int:
    data = gather(args.socket, timeout=args.timeout, num_queues=args.num_queues)
    print(json.dumps(data, indent=2) if args.json else format_text(data))
    return 0
