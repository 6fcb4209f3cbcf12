#!/bin/bash
# Installs what `make demo` and `make test` need on Debian bookworm, then vblk itself
# (editable, with its dev extras) into the venv .venv. Run as root (or with sudo
# available). Idempotent: apt is skipped, apt-get update included, when every package
# is already installed, and pip is skipped when this checkout is already what the venv imports.
#
# The venv is made from Debian's own interpreter (/usr/bin/python3) with
# --system-site-packages: Debian's bindings for libnbd and librbd (python3-libnbd,
# python3-rbd, python3-rados) are built for that interpreter only, and a venv keeps
# pip's packages out of the system's (PEP 668). PYTHON overrides the venv's path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PY=${PYTHON:-$ROOT/.venv/bin/python}

# QEMU (system emulator, qemu-img, qemu-storage-daemon), the guest's kernel and
# userland (busybox-static, fio, e2fsprogs), cpio for poking at initramfs images, strace
# for the durability test (FLUSH must be an fdatasync with every I/O engine).
# Storage peers and their bindings: libnbd (python3-libnbd, nbdsh) drives qemu-nbd and NBD
# servers, nbdkit (with its python plugin) is the NBD interop peer, qemu-block-extra gives
# qemu-storage-daemon its rbd driver, a single-node Ceph (mon, mgr, osd) serves RBD images
# to the tests through librbd (python3-rbd, python3-rados). Chromium (headless) loads the
# live page of the metrics endpoint in its test.
PKGS=(qemu-system-x86 qemu-utils qemu-system-common linux-image-amd64 busybox-static fio e2fsprogs cpio strace
  python3 python3-venv python3-libnbd libnbd-bin nbdkit nbdkit-plugin-python qemu-block-extra
  ceph-mon ceph-osd ceph-mgr ceph-common python3-rbd python3-rados chromium)

SUDO=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO=(sudo); fi
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-deps: system packages present"
fi

if [ ! -x "$PY" ] && [ "$PY" = "$ROOT/.venv/bin/python" ]; then
  echo "install-deps: python3 -m venv --system-site-packages .venv"
  /usr/bin/python3 -m venv --system-site-packages "$ROOT/.venv"
fi

# vblk, editable, plus pytest/hypothesis/mypy/ruff and matplotlib (bench/compare.py's
# chart). Checked from / so that the checkout's own directory on sys.path cannot pass
# for an installed package.
installed=$(cd / && "$PY" -c 'import os, vblk, pytest, hypothesis, mypy, ruff, matplotlib, prometheus_client, rich
print(os.path.dirname(os.path.dirname(os.path.realpath(vblk.__file__))))' 2>/dev/null || true)
if [ "$installed" != "$ROOT" ]; then
  echo "install-deps: pip install -e .[dev]"
  # Debian's own python3 is "externally managed" (PEP 668); this is a dev/CI machine.
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
    "$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
else
  echo "install-deps: vblk (editable) and dev tools present"
fi
