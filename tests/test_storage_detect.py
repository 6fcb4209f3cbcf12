"""Image formats come from the header's magic, never from the file name."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vblk.storage.detect import detect_format, probe


@pytest.mark.parametrize(
    ("header", "fmt"),
    [
        (b"QFI\xfb\x00\x00\x00\x03", "qcow2"),
        (b"QFI\xfb\x00\x00\x00\x02", "qcow2"),
        (b"QFI\xfb\x00\x00\x00\x01", "qcow"),
        (b"QED\x00", "qed"),
        (b"KDMV\x01\x00\x00\x00", "vmdk"),
        (b"# Disk DescriptorFile\n", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"LUKS\xba\xbe\x00\x01", "luks"),
        (b"WithoutFreeSpace", "parallels"),
        (
            b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0")
            + struct.pack("<I", 0xBEDA107F),
            "vdi",
        ),
        (b"", "raw"),
        (bytes(512), "raw"),
        (b"QFI", "raw"),
        (b"\xeb\x63\x90" + bytes(509), "raw"),  # an MBR boot sector
    ],
)
def test_probe(header: bytes, fmt: str) -> None:
    assert probe(header) == fmt


def test_the_name_does_not_matter(tmp_path: Path) -> None:
    p = tmp_path / "disk.qcow2"
    p.write_bytes(bytes(4096))
    assert detect_format(str(p)) == "raw"


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vpc", "vdi", "qed", "parallels"])
def test_images_made_by_qemu_img(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / "img.raw"  # a misleading name on purpose
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(p), "16M"], check=True)
    assert detect_format(str(p)) == fmt
