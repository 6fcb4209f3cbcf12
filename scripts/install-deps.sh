#!/bin/bash
# Installs what `make demo` and `make test` need on Debian bookworm, then vblk itself
# (editable, with its dev extras). Run as root (or with sudo available). Idempotent:
# apt is skipped, apt-get update included, when every package is already installed,
# and pip is skipped when this checkout is already what Python imports.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PY=${PYTHON:-python3}

# QEMU (system emulator, qemu-img, qemu-storage-daemon), the guest's kernel and
# userland (busybox-static, fio, e2fsprogs), cpio for poking at initramfs images, strace
# for the durability test (FLUSH must be an fdatasync with every I/O engine).
PKGS=(qemu-system-x86 qemu-utils qemu-system-common linux-image-amd64 busybox-static fio e2fsprogs cpio strace)
if ! "$PY" -m pip --version >/dev/null 2>&1; then PKGS+=(python3-pip); fi

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

# vblk, editable, plus pytest/hypothesis/mypy/ruff and matplotlib (bench/compare.py's
# chart). Checked from / so that the checkout's own directory on sys.path cannot pass
# for an installed package.
installed=$(cd / && "$PY" -c 'import os, vblk, pytest, hypothesis, mypy, ruff, matplotlib
print(os.path.dirname(os.path.dirname(os.path.realpath(vblk.__file__))))' 2>/dev/null || true)
if [ "$installed" != "$ROOT" ]; then
  echo "install-deps: pip install -e .[dev]"
  # Debian's own python3 is "externally managed" (PEP 668); this is a dev/CI machine.
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
    "$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
else
  echo "install-deps: vblk (editable) and dev tools present"
fi
