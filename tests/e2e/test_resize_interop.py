"""Live resize, qemu-storage-daemon as the reference: QMP block_resize vs vblk ctl export-resize.

Two guests boot at once with the same workload: one on a qemu-storage-daemon
vhost-user-blk export resized through QMP ``block_resize``, one on a ``vblk daemon``
export resized through ``vblk ctl export-resize``. What each guest sees must match:
the size before and after, the kernel's capacity-change line, and the new last MiB
written and read back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import guest as guest_tool
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.interop]

MiB = 1 << 20
BEFORE, AFTER = 64 * MiB, 96 * MiB

WORKLOAD = """
before=$(cat /sys/block/vda/size)
echo "size_before=$before"
echo RESIZE_NOW
i=0; while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
after=$(cat /sys/block/vda/size)
echo "size_after=$after"
echo "kernel=$(dmesg | grep -o 'new size: .*' | tail -1 | tr ' ' _)"
last=$(( after / 2048 - 1 ))
dd if=/dev/urandom of=/tmp/last bs=1M count=1 2>/dev/null
dd if=/tmp/last of=/dev/vda bs=1M seek=$last count=1 oflag=direct 2>/dev/null && echo write=ok
dd if=/dev/vda of=/tmp/back bs=1M skip=$last count=1 iflag=direct 2>/dev/null
cmp /tmp/last /tmp/back && echo readback=ok
"""


def _line_rpc(path: Path, obj: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(path))
        s.sendall(json.dumps(obj).encode() + b"\n")
        f = s.makefile("rb")
        answer: dict[str, Any] = json.loads(f.readline())
        return answer


def _qmp(path: Path, command: str, **arguments: Any) -> dict[str, Any]:
    """One QMP command on a fresh connection (greeting, capabilities, command)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                ans: dict[str, Any] = json.loads(f.readline())
                if "event" not in ans:
                    break
            assert "error" not in ans, ans
        return ans


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def _image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(BEFORE)
    return path


def test_guest_sees_the_same_resize_through_qsd_and_vblk(
    guest: guest_tool.Guest, tmp_path: Path
) -> None:
    qsd_bin = shutil.which("qemu-storage-daemon")
    if qsd_bin is None:
        pytest.fail("qemu-storage-daemon is missing: bash scripts/install-deps.sh")
    qsd_img, vblk_img = _image(tmp_path / "qsd.img"), _image(tmp_path / "vblk.img")
    qsd_sock, qmp = tmp_path / "qsd.sock", tmp_path / "qmp.sock"
    vblk_sock, control = tmp_path / "vblk.sock", tmp_path / "ctl"
    qsd_log, vblk_log = tmp_path / "qsd.log", tmp_path / "vblk.log"
    qsd = subprocess.Popen(
        [qsd_bin,
         "--blockdev", f"driver=file,node-name=file0,filename={qsd_img}",
         "--blockdev", "driver=raw,node-name=disk0,file=file0",
         "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
         f"addr.path={qsd_sock},writable=on,num-queues=1",
         "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
         "--monitor", "chardev=qmp0"],
        stdout=subprocess.DEVNULL, stderr=open(qsd_log, "wb"),
    )  # fmt: skip
    vblk = subprocess.Popen(
        [sys.executable, "-m", "vblk", "daemon", "--control", str(control)],
        stdout=subprocess.DEVNULL, stderr=open(vblk_log, "wb"),
    )  # fmt: skip
    results: dict[str, Any] = {}
    answers: dict[str, Any] = {}
    try:
        _wait_for(qsd_sock, qsd, qsd_log)
        _wait_for(qmp, qsd, qsd_log)
        _wait_for(control, vblk, vblk_log)
        add = {"id": "disk", "spec": str(vblk_img), "socket": str(vblk_sock), "num_queues": 1}
        assert "result" in _line_rpc(
            control, {"jsonrpc": "2.0", "id": 1, "method": "export-add", "params": add}
        )
        resize = {
            "qsd": lambda: _qmp(qmp, "block_resize", **{"node-name": "disk0", "size": AFTER}),
            "vblk": lambda: _line_rpc(
                control,
                {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "export-resize",
                    "params": {"id": "disk", "size": AFTER},
                },
            ),
        }

        def run(name: str, sock: Path, proc: subprocess.Popen[bytes]) -> None:
            def on_line(line: str) -> None:
                if "RESIZE_NOW" in line and name not in answers:
                    answers[name] = None
                    threading.Thread(
                        target=lambda: answers.__setitem__(name, resize[name]())
                    ).start()

            try:
                results[name] = guest_tool.run_guest(
                    sock, WORKLOAD, guest=guest, on_line=on_line,
                    alive=lambda: proc.poll() is None,
                )  # fmt: skip
            except guest_tool.GuestError as e:
                results[name] = e

        threads = [
            threading.Thread(target=run, args=("qsd", qsd_sock, qsd)),
            threading.Thread(target=run, args=("vblk", vblk_sock, vblk)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(400)
    finally:
        for p in (qsd, vblk):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    for name in ("qsd", "vblk"):
        r = results.get(name)
        assert isinstance(r, guest_tool.GuestResult), (name, r)
    q, v = results["qsd"].values, results["vblk"].values
    assert answers["qsd"] == {"return": {}}, answers
    assert answers["vblk"]["result"]["guest_notified"] is True, answers
    # vblk: the guest sees the new size at once, and uses it.
    assert v["size_before"] == str(BEFORE // 512) and v["size_after"] == str(AFTER // 512), v
    assert "new_size:_196608" in v["kernel"], v
    assert v.get("write") == "ok" and v.get("readback") == "ok", results["vblk"].output
    assert os.path.getsize(qsd_img) == os.path.getsize(vblk_img) == AFTER
    # The reference: where qemu-storage-daemon tells the guest, it must see what vblk's saw.
    # (qemu-storage-daemon 7.2 here grows the image, but its guest keeps the old size: no
    # config interrupt reaches it. The guest then writes the last MiB of the old size.)
    assert q["size_before"] == v["size_before"], q
    if q["size_after"] != q["size_before"]:
        for key in ("size_after", "kernel", "write", "readback"):
            assert v.get(key) == q.get(key), (key, q, v)
    else:
        assert q["kernel"] == "" and q.get("readback") == "ok", q
    print(
        f"resize seen by the guest: qsd {q['size_before']} -> {q['size_after']} sectors, "
        f"vblk {v['size_before']} -> {v['size_after']} sectors"
    )
