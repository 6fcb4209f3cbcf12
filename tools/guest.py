#!/usr/bin/env python3
"""Build a tiny Linux guest and boot it under QEMU against a vhost-user-blk socket.

The guest is the host's Debian kernel plus an initramfs holding busybox, fio,
e2fsprogs and the virtio-blk/ext4 modules. Its init runs one workload script
and powers off, so a test can ask "what does the guest's own virtio-blk driver
see?" in a few seconds of TCG. Used by tests/e2e and by ``make demo``.

    python3 tools/guest.py build
    python3 tools/guest.py run --socket /tmp/vblk.sock --workload script.sh --smp 2 --num-queues 2

From Python::

    res = run_guest(socket="/tmp/vblk.sock", workload="cat /sys/block/vda/size", timeout=180)
    res.rc, res.output, res.wall, parse_values(res.output)

``on_line`` sees each console line as it arrives (the guest is still running), so a
host can act on markers the workload prints, e.g. sample a backend's CPU time
at ``@@JOB x start`` and ``@@JOB x end``.

The workload runs with ``sh -e``; its exit status is ``res.rc``. Whatever goes
wrong (QEMU fails to start, the guest never reaches the workload, the timeout
expires and QEMU is killed), the tail of QEMU's console is printed to stderr.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("VBLK_GUEST_CACHE", Path.home() / ".cache" / "vblk" / "guest"))
#: Modules the guest needs; their dependencies are resolved from modules.dep.
MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
BINARIES = ("/usr/bin/fio", "/usr/sbin/mke2fs", "/usr/sbin/e2fsck", "/usr/sbin/blkdiscard")
BEGIN, END = "@@VBLK-BEGIN@@", "@@VBLK-END@@"

# The guest's /init. Modules load in dependency order; the workload runs with sh -e
# between markers, then the guest powers off whatever happened.
INIT = """#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "insmod $m failed"; done
n=0; while [ ! -e /sys/block/vda ] && [ $n -lt 40 ]; do sleep 0.25; n=$((n+1)); done
echo "%(begin)s"
sh -e /workload.sh; echo "@@RC=$?"
echo "%(end)s"
sync; poweroff -f
""".replace("%(begin)s", BEGIN).replace("%(end)s", END)
VERSION = hashlib.sha256(INIT.encode() + repr((MODULES, BINARIES)).encode()).hexdigest()[:12]


class GuestError(RuntimeError):
    """The guest could not be built or did not run its workload (the message has QEMU's tail)."""


@dataclass
class Guest:
    kernel: Path
    initrd: Path


@dataclass
class GuestResult:
    rc: int
    output: str  # what the workload printed
    console: str  # the whole serial console, for debugging
    wall: float
    values: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # the QEMU command line


def parse_values(text: str) -> dict[str, str]:
    """``key=value`` tokens the workload printed, last one wins."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z_][\w.]*)=(\S*)", text):
        out[m.group(1)] = m.group(2)
    return out


# -- the initramfs ----------------------------------------------------------------


def _cpio(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data) entries; symlinks carry their target as data."""
    buf = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        buf.write(b"070701" + "".join(f"{v:08X}" for v in fields).encode() + raw)
        buf.write(b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4))
    return buf.getvalue()


def _module_order(kver: str) -> list[tuple[str, Path]]:
    """MODULES and everything they depend on, dependencies first."""
    base = Path("/lib/modules") / kver
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {
        re.sub(r"\.ko(\.[xg]z|\.zst)?$", "", Path(p).name).replace("-", "_"): p for p in deps
    }
    order: list[str] = []

    def visit(path: str) -> None:
        # modules.dep lists the full closure, nearest dependency last.
        for d in reversed(deps[path]):
            if d not in order:
                visit(d)
        if path not in order:
            order.append(path)

    for name in MODULES:
        if name not in by_name:
            raise GuestError(f"kernel {kver} has no module {name}")
        visit(by_name[name])
    return [(re.sub(r"\.ko.*$", "", Path(p).name), base / p) for p in order]


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    return re.findall(r"(/\S+) \(0x", out)


def build(cache: Path = CACHE) -> Guest:
    """The guest for this host's newest kernel, built once and cached."""
    # Only kernels with both an image in /boot and modules (a container's /lib/modules
    # may also hold the host kernel's directory, without its vmlinuz).
    kvers = sorted(
        (
            v
            for v in (os.listdir("/lib/modules") if os.path.isdir("/lib/modules") else [])
            if os.path.exists(f"/boot/vmlinuz-{v}")
            and os.path.exists(f"/lib/modules/{v}/modules.dep")
        ),
        key=lambda v: [int(x) if x.isdigit() else -1 for x in re.split(r"[.-]", v)],
    )
    if not kvers:
        raise GuestError(
            "no kernel with /boot/vmlinuz-* and /lib/modules/*/modules.dep: "
            "run scripts/install-deps.sh (linux-image-amd64)"
        )
    kver = kvers[-1]
    out = cache / f"{kver}-{VERSION}"
    guest = Guest(out / "vmlinuz", out / "initrd.gz")
    if guest.kernel.exists() and guest.initrd.exists():
        return guest
    # busybox-static's /bin/busybox first: the guest has no libc of its own to spare.
    busybox = "/bin/busybox" if os.path.exists("/bin/busybox") else shutil.which("busybox") or ""
    for need in (busybox, *BINARIES, f"/boot/vmlinuz-{kver}"):
        if not os.path.exists(need):
            raise GuestError(f"{need} is missing: run scripts/install-deps.sh")
    entries: list[tuple[str, int, bytes]] = []
    dirs = [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "mnt",
        "modules",
        "etc",
    ]
    entries += [(d, 0o40755, b"") for d in dirs]
    entries.append(("bin/busybox", 0o100755, Path(busybox).read_bytes()))
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    entries += [(f"bin/{a}", 0o120777, b"busybox") for a in applets if a != "busybox"]
    seen: set[str] = set()
    for binary in BINARIES:
        for f in [binary, *_libraries(binary)]:
            real = os.path.realpath(f)
            if f in seen:
                continue
            seen.add(f)
            parts = Path(f).parent.parts[1:]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.append(d)
                    entries.append((d, 0o40755, b""))
            entries.append((f.lstrip("/"), 0o100755, Path(real).read_bytes()))
    entries.append(("sbin/mkfs.ext4", 0o120777, b"/usr/sbin/mke2fs"))
    order = _module_order(kver)
    for name, path in order:
        data = path.read_bytes()
        if path.suffix == ".xz":
            import lzma

            data = lzma.decompress(data)
        entries.append((f"modules/{name}.ko", 0o100644, data))
    entries.append(("modules.order", 0o100644, "\n".join(n for n, _ in order).encode() + b"\n"))
    entries.append(("init", 0o100755, INIT.encode()))
    out.mkdir(parents=True, exist_ok=True)
    # Concurrent builders (make demo next to a test run) each write their own temp
    # files and rename them into place; the initrd goes last since it marks "done".
    for data, dest in (
        (Path(f"/boot/vmlinuz-{kver}").read_bytes(), guest.kernel),
        (gzip.compress(_cpio(entries), 1), guest.initrd),
    ):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{dest.name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    return guest


# -- booting ------------------------------------------------------------------------


def qemu_command(
    guest: Guest,
    initrd: str,
    *,
    socket: str | None = None,
    image: str | None = None,
    num_queues: int = 1,
    smp: int = 1,
    mem: str = "512M",
    device_opts: str = "",
    aio: str = "threads",
    reconnect: int = 0,
) -> list[str]:
    """QEMU (TCG) with the guest's disk on a vhost-user socket, or on QEMU's own virtio-blk
    (O_DIRECT, ``aio`` = threads, native or io_uring).

    ``reconnect`` (seconds, 0 = never): QEMU redials a backend that went away, so
    the backend can be restarted under a running guest. ``num_queues`` 0 leaves the
    device's num-queues unset: QEMU then gives it one queue per vCPU.
    """
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", mem, "-smp", str(smp),
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults",
        "-kernel", str(guest.kernel), "-initrd", initrd,
        "-append", "console=ttyS0 panic=-1 quiet",
    ]  # fmt: skip
    opts = f",{device_opts}" if device_opts else ""
    if num_queues:
        opts = f",num-queues={num_queues}{opts}"
    if socket is not None:
        chardev = f"socket,id=c0,path={socket}" + (f",reconnect={reconnect}" if reconnect else "")
        cmd += [
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-chardev", chardev,
            "-device", f"vhost-user-blk-pci,chardev=c0{opts}",
        ]  # fmt: skip
    elif image is not None:
        cmd += [
            "-drive", f"file={image},if=none,id=d0,format=raw,cache=none,aio={aio}",
            "-device", f"virtio-blk-pci,drive=d0{opts}",
        ]  # fmt: skip
    else:
        raise ValueError("a socket or an image is needed")
    return cmd


def _tail(console: str, lines: int = 40) -> str:
    return "\n".join(console.rstrip("\n").splitlines()[-lines:])


def _fail(message: str, console: str) -> GuestError:
    """Print QEMU's last lines to stderr (pytest shows them on failure); return the error."""
    tail = _tail(console)
    print(f"--- guest: {message}; last lines of the QEMU console:\n{tail}\n---", file=sys.stderr)
    return GuestError(f"{message}; console tail:\n{tail}")


def run_guest(
    socket: str | os.PathLike[str] | None = None,
    workload: str = "",
    *,
    num_queues: int = 1,
    smp: int = 1,
    mem: str = "512M",
    timeout: float = 180,
    extra_device_opts: str = "",
    image: str | os.PathLike[str] | None = None,
    guest: Guest | None = None,
    alive: Callable[[], bool] | None = None,
    on_line: Callable[[str], None] | None = None,
    aio: str = "threads",
    reconnect: int = 0,
) -> GuestResult:
    """Boot the guest against ``socket`` (or, as a baseline, QEMU's own virtio-blk on ``image``),
    run ``workload`` (shell text) inside it and return what it printed.

    QEMU is killed when ``timeout`` seconds pass, or as soon as ``alive()`` (polled twice a
    second; e.g. "is the backend process still running?") returns false, since a guest whose
    disk went away would hang until the timeout. Those, a QEMU that cannot start and a guest
    that never reaches the workload raise :class:`GuestError`. A workload that fails is not
    an error: its status is ``rc``, and QEMU's tail is printed to stderr for whoever reads
    the failure.

    ``on_line(line)`` is called from a reader thread for each console line (without its
    line ending) while the guest runs; if it raises, the guest still runs to its end and
    the first exception is raised afterwards. ``aio`` is the ``-drive`` aio mode for
    ``image``. ``reconnect`` is passed to
    :func:`qemu_command`.
    """
    guest = guest or build()
    extra = gzip.compress(_cpio([("workload.sh", 0o100755, workload.encode())]), 1)
    with tempfile.NamedTemporaryFile(prefix="vblk-guest-", suffix=".initrd") as f:
        f.write(guest.initrd.read_bytes() + extra)
        f.flush()
        cmd = qemu_command(
            guest, f.name, socket=None if socket is None else os.fspath(socket),
            image=None if image is None else os.fspath(image), num_queues=num_queues, smp=smp,
            mem=mem, device_opts=extra_device_opts, aio=aio, reconnect=reconnect,
        )  # fmt: skip
        t0 = time.monotonic()
        # stdin is not the terminal: QEMU's stdio chardev would leave a tty in raw mode
        # if it were killed.
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        chunks: list[bytes] = []
        hook_errors: list[BaseException] = []

        def pump() -> None:
            # Lines, as they come; the pipe is always drained so QEMU never blocks on it.
            assert p.stdout is not None
            for raw in p.stdout:
                chunks.append(raw)
                if on_line is not None and not hook_errors:
                    try:
                        on_line(raw.decode(errors="replace").rstrip("\r\n"))
                    except BaseException as e:  # re-raised once QEMU is done
                        hook_errors.append(e)

        reader = threading.Thread(target=pump, name="guest-console", daemon=True)
        reader.start()
        why = ""
        try:
            while True:
                try:
                    p.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() - t0 > timeout:
                        why = f"guest timed out after {timeout:.0f}s, QEMU killed"
                    elif alive is not None and not alive():
                        why = "the backend went away while the guest ran, QEMU killed"
                    if why:
                        p.kill()
                        p.wait()
                        break
        finally:
            if p.poll() is None:  # an exception (^C) while waiting: QEMU must not outlive us
                p.kill()
                p.wait()
            reader.join()
        wall = time.monotonic() - t0
    console = b"".join(chunks).decode(errors="replace").replace("\r", "")
    if why:
        raise _fail(why, console)
    if hook_errors:
        raise hook_errors[0]
    if BEGIN not in console:
        raise _fail(f"guest never ran the workload (QEMU exit status {p.returncode})", console)
    body = console.split(BEGIN, 1)[1].split(END, 1)[0]
    rcs = re.findall(r"^@@RC=(\d+)$", body, re.M)
    output = re.sub(r"^@@RC=\d+\n?", "", body, flags=re.M).strip("\n")
    rc = int(rcs[-1]) if rcs else 255
    if rc != 0:
        _fail(f"workload exited with status {rc}", console)
    return GuestResult(rc, output, console, wall, parse_values(output), cmd)


def run(
    workload: str,
    *,
    socket: str | None = None,
    image: str | None = None,
    num_queues: int = 1,
    smp: int = 1,
    mem: str = "512M",
    timeout: float = 180,
    device_opts: str = "",
    guest: Guest | None = None,
) -> GuestResult:
    """:func:`run_guest` with the workload first (kept for older callers)."""
    return run_guest(
        socket, workload, num_queues=num_queues, smp=smp, mem=mem, timeout=timeout,
        extra_device_opts=device_opts, image=image, guest=guest,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the cached guest and print its paths")
    r = sub.add_parser("run", help="boot the guest and run a workload script")
    target = r.add_mutually_exclusive_group(required=True)
    target.add_argument("--socket", help="vhost-user-blk socket")
    target.add_argument("--image", help="raw image for QEMU's own virtio-blk (baseline)")
    r.add_argument("--workload", required=True, help="shell script run inside the guest")
    r.add_argument("--num-queues", type=int, default=1, help="0: unset (one per vCPU)")
    r.add_argument("--smp", type=int, default=1)
    r.add_argument("--mem", default="512M")
    r.add_argument("--timeout", type=float, default=180)
    r.add_argument("--device-opts", default="")
    r.add_argument("--aio", default="threads", help="-drive aio mode with --image")
    r.add_argument(
        "--reconnect", type=int, default=0, help="seconds between QEMU's redials of the socket"
    )
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            g = build()
            print(g.kernel, g.initrd, sep="\n")
            return 0
        res = run_guest(
            a.socket, Path(a.workload).read_text(), image=a.image, num_queues=a.num_queues,
            smp=a.smp, mem=a.mem, timeout=a.timeout, extra_device_opts=a.device_opts,
            aio=a.aio, reconnect=a.reconnect,
        )  # fmt: skip
    except GuestError as e:
        print(f"guest: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 3
    print(res.output)
    print(f"@@WALL={res.wall:.1f}s")
    return res.rc


if __name__ == "__main__":
    sys.exit(main())
