"""The daemon's config file (TOML): the exports to start with.

    [[export]]
    id = "disk0"
    spec = "/var/lib/vblk/disk0.img"
    socket = "/run/vblk/disk0.sock"
    num_queues = 2

    [export.qos]
    iops = 1500

Each ``[[export]]`` table takes export-add's parameters, checked the same
way (:func:`vblk.control.methods.validate`), plus an optional ``qos`` table
with export-set-qos's. Pure: text in, checked params out.
"""

from __future__ import annotations

import tomllib
from typing import Any

from vblk.control.jsonrpc import RpcError
from vblk.control.methods import validate
from vblk.errors import VblkError

__all__ = ["ConfigError", "parse_config"]


class ConfigError(VblkError):
    """The config file cannot be used; the message names the export and the parameter."""


def parse_config(text: str) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(export-add params, export-set-qos params or None) for each export, in order."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}") from None
    unknown = set(doc) - {"export"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)} (expected [[export]])")
    exports = doc.get("export", [])
    if not isinstance(exports, list):
        raise ConfigError("export must be an array of tables ([[export]])")
    out: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    seen: set[str] = set()
    for n, table in enumerate(exports, 1):
        if not isinstance(table, dict):
            raise ConfigError(f"export #{n}: expected a table")
        table = dict(table)
        qos = table.pop("qos", None)
        try:
            params = validate("export-add", table)
            qos_params = None
            if qos is not None:
                if not isinstance(qos, dict):
                    raise ConfigError(f"export #{n}: qos must be a table")
                if "id" in qos:
                    raise ConfigError(f"export #{n}: qos takes no id (it is the export's)")
                qos_params = validate("export-set-qos", {**qos, "id": params["id"]})
        except RpcError as e:
            raise ConfigError(
                f"export #{n}: {e.message.removeprefix('invalid params: ')}"
            ) from None
        if params["id"] in seen:
            raise ConfigError(f"export #{n}: id {params['id']!r} is used twice")
        seen.add(params["id"])
        out.append((params, qos_params))
    return out
