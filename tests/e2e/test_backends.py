"""Storage backends under a real guest: a raw file, a Python plugin, and the fault injector.

One boot each: fio verify, ext4 mkfs/mount/fsck, write-zeroes and discard
(the shared integrity workload), then the host checks what landed where.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import guest as guest_tool
import pytest
from e2e_backend import Backend, Boot, make_image, vblk_only, workload

pytestmark = [pytest.mark.e2e, vblk_only]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SIZE = 256 << 20
PATTERN_OFFSET = 240 << 20
PATTERN_SIZE = 2 << 20


def _serve(tmp: Path, name: str, spec: str | None = None, *extra: str) -> Backend:
    image = make_image(tmp / f"{name}.img", SIZE)
    return Backend(
        image, tmp / f"{name}.sock", tmp / f"{name}.log", num_queues=1, extra=extra, spec=spec
    )


@pytest.mark.parametrize("backend", ["raw", "ramdisk"])
def test_integrity(tmp_path: Path, boot: Boot, backend: str) -> None:
    if backend == "raw":
        b = _serve(tmp_path, backend)
    else:
        spec = f"python:{EXAMPLES / 'ramdisk.py'}:RamDisk"
        b = _serve(tmp_path, backend, spec, "--opt", f"size={SIZE}")
    try:
        res = boot(b, workload("integrity.sh"), timeout=300)
    finally:
        rc = b.stop()
    assert rc == 0, b.log[-3000:]
    v = guest_tool.parse_values(res.output)
    assert v.get("size_sectors") == str(SIZE // 512), res.output
    for key in ("fio_verify", "files", "write_zeroes", "discard", "wz_cmd"):
        assert v.get(key) == "ok", f"{key}: {res.output}"
    assert v.get("fsck") == "clean", res.output
    assert v.get("mount") == "ok", res.output
    if backend == "raw":
        with open(b.image, "rb") as f:
            f.seek(PATTERN_OFFSET)
            assert hashlib.md5(f.read(PATTERN_SIZE)).hexdigest() == v["pattern_md5"]
        assert "serving raw file" in b.log
    else:
        assert "python plugin" in b.log


def test_fault_injection_fails_the_chosen_range_only(tmp_path: Path, boot: Boot) -> None:
    base = make_image(tmp_path / "base.img", 64 << 20)
    spec = f"python:{EXAMPLES / 'faulty.py'}:Faulty"
    b = _serve(
        tmp_path,
        "faulty",
        spec,
        "--opt",
        f"spec={base}",
        "--opt",
        "fail=1M-2M",
        "--opt",
        "ops=read",
    )
    try:
        res = boot(b, workload("faulty.sh"))
    finally:
        rc = b.stop()
    assert rc == 0, b.log[-3000:]
    v = guest_tool.parse_values(res.output)
    assert v.get("bad_read") == "EIO", res.output
    assert v.get("bad_read_again") == "EIO", res.output  # still failing, still serving
    assert (v.get("good_read"), v.get("write"), v.get("readback")) == ("ok", "ok", "ok"), res.output
    with open(base, "rb") as f:
        f.seek(64 * 65536)
        assert hashlib.md5(f.read(16 * 65536)).hexdigest() == v["after_md5"]
