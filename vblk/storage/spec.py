"""A storage spec (the SPEC of ``vblk serve``) to an open :class:`~vblk.storage.base.Storage`.

- ``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``: an NBD server;
- ``rbd:POOL/IMAGE``: a Ceph RBD image;
- ``python:FILE.py:CLASS``: a user's class (:mod:`vblk.storage.plugin`);
- anything else is a PATH: a raw file or block device, or an image in a format
  qemu-img knows (detected from its header, never its name; ``fmt`` forces one).

Every failure is a :class:`StorageError` of one line, for ``vblk: error: ...``.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from types import ModuleType

from vblk.storage.base import Storage, StorageError
from vblk.storage.detect import detect_format

__all__ = ["open_storage", "parse_opt"]

log = logging.getLogger(__name__)

_NBD_PREFIXES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_FORMAT = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def parse_opt(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a ``--opt``) into its two parts; ValueError with the reason."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    if not _KEY.match(key):
        raise ValueError(f"{key!r} is not an option name (letters, digits, _ . -)")
    return key, value


def open_storage(
    spec: str,
    *,
    opts: dict[str, str],
    read_only: bool,
    direct: bool = False,
    fmt: str | None = None,
    aio: str | None = None,
    io_threads: int = 4,
    create: int | None = None,
) -> Storage:
    """Open ``spec``; ``direct``, ``aio``, ``io_threads`` and ``create`` are for raw files."""
    if not spec:
        raise StorageError("empty storage spec")
    for key in opts:
        if not _KEY.match(key):
            raise StorageError(f"--opt {key!r}: not an option name")
    if fmt is not None and not _FORMAT.match(fmt):
        raise StorageError(f"--format {fmt!r} is not a format name")
    if spec.startswith(_NBD_PREFIXES) or spec.startswith(("rbd:", "python:")):
        kind = spec.split(":", 1)[0]
        for given, flag in ((direct, "--direct"), (create is not None, "--create")):
            if given:
                raise StorageError(f"{flag} applies to image files, not to {kind}: specs")
        if fmt is not None:
            raise StorageError(f"--format applies to image files, not to {kind}: specs")
        if spec.startswith(_NBD_PREFIXES):
            nbd = _backend("nbd", "NBD")
            return _guard(spec, lambda: nbd.open_nbd(spec, opts, read_only))
        if spec.startswith("rbd:"):
            rbd = _backend("rbd", "Ceph RBD")
            rest = spec[len("rbd:") :]
            return _guard(spec, lambda: rbd.open_rbd(rest, opts, read_only))
        from vblk.storage.plugin import open_plugin

        target = spec[len("python:") :]
        return _guard(spec, lambda: open_plugin(target, opts, read_only))
    return _open_path(spec, opts, read_only, direct, fmt, aio, io_threads, create)


def _open_path(
    path: str,
    opts: dict[str, str],
    read_only: bool,
    direct: bool,
    fmt: str | None,
    aio: str | None,
    io_threads: int,
    create: int | None,
) -> Storage:
    from vblk.storage.file import FileStorage, create_raw

    if create is not None:
        if fmt not in (None, "raw"):
            raise StorageError(f"--create makes raw images only, not {fmt}")
        if create_raw(path, create):
            log.info("created %s (%d bytes, sparse)", path, create)
    if fmt is None:
        fmt = _detect(path)
    if fmt == "raw":
        if opts:
            raise StorageError(f"{path}: raw images take no --opt (got {', '.join(opts)})")
        return FileStorage(path, read_only=read_only, direct=direct, aio=aio, io_threads=io_threads)
    if direct:
        raise StorageError(f"{path}: --direct applies to raw images only (this one is {fmt})")
    nbd = _backend("nbd", f"{fmt} image")
    fmt_name = fmt
    return _guard(path, lambda: nbd.open_image(path, fmt_name, opts, read_only))


def _detect(path: str) -> str:
    try:
        return detect_format(path)
    except FileNotFoundError:
        raise StorageError(f"{path}: no such image (use --create SIZE to make one)") from None
    except IsADirectoryError:
        raise StorageError(f"{path}: is a directory, not an image") from None
    except OSError as e:
        raise StorageError(f"{path}: cannot read: {e.strerror or e}") from None


def _backend(name: str, label: str) -> ModuleType:
    """The backend module ``vblk.storage.NAME``, imported only when a spec needs it."""
    module = f"vblk.storage.{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise StorageError(f"the {label} backend is not available in this vblk") from None
        raise StorageError(f"the {label} backend needs {e.name}, which is not installed") from None
    except ImportError as e:
        raise StorageError(f"the {label} backend cannot load: {e}") from None


def _guard(spec: str, opener: Callable[[], Storage]) -> Storage:
    """Run a backend's opener; anything it raises other than StorageError becomes one line."""
    try:
        return opener()
    except StorageError:
        raise
    except Exception as e:
        log.debug("opening %s failed", spec, exc_info=True)
        text = " ".join(str(e).split()) or type(e).__name__
        raise StorageError(f"{spec}: cannot open: {text}") from None
