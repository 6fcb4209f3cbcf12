#!/bin/bash
# Installs what the demo and the tests need on Debian bookworm (run as root), then vblk itself.
# Idempotent: apt is skipped when every package is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(qemu-system-x86 qemu-utils qemu-system-common linux-image-amd64 busybox-static fio e2fsprogs util-linux cpio)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
if ! "$PY" -c 'import vblk, pytest, hypothesis, mypy, ruff' >/dev/null 2>&1 || [ "${CI:-}" = true ]; then
  echo "install-deps: pip install -e .[dev]"
  "$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
fi
