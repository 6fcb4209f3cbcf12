# The README's two commands are `make demo` and `make test`; the rest are for developers.
# Everything runs as root on Debian bookworm (scripts/install-deps.sh installs QEMU etc.).
# The venv scripts/install-deps.sh makes from Debian's python3 (it sees python3-libnbd and
# python3-rbd); PYTHON=... runs everything with another interpreter.
PYTHON ?= $(CURDIR)/.venv/bin/python

.PHONY: demo test deps lint fmt unit e2e e2e-qsd soak interop compare guest clean

# Serve demo/disk.img with vblk serve (2 queues) and let a real QEMU guest run fio on it.
demo: deps
	$(PYTHON) scripts/demo.py

# Lint, type-check, then every test: unit, interop (qemu-storage-daemon) and e2e (QEMU guests).
test:
	PYTHON=$(PYTHON) bash scripts/install-deps.sh
	$(PYTHON) -m ruff check vblk tests tools scripts bench examples
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy --strict tools/guest.py bench/compare.py
	$(PYTHON) -m pytest -v --durations=10

deps:
	PYTHON=$(PYTHON) bash scripts/install-deps.sh

lint:
	$(PYTHON) -m ruff check vblk tests tools scripts bench examples
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy --strict tools/guest.py bench/compare.py

fmt:
	$(PYTHON) -m ruff format vblk tests tools scripts bench examples

unit:
	$(PYTHON) -m pytest -m "not e2e and not interop"

interop:
	$(PYTHON) -m pytest -v -m interop

# Guest tests against vblk serve, or against qemu-storage-daemon as the reference backend.
e2e:
	$(PYTHON) -m pytest -v tests/e2e

e2e-qsd:
	VBLK_E2E_BACKEND=qsd $(PYTHON) -m pytest -v tests/e2e

# Kill and restart vblk serve every few seconds under guest fio verify (VBLK_SOAK_SECONDS, 300).
soak:
	VBLK_SOAK=1 $(PYTHON) -m pytest -v -s tests/e2e/test_restart.py -k soak

# Build (or find) the cached guest kernel + initramfs.
guest:
	$(PYTHON) tools/guest.py build

# vblk serve vs qemu-storage-daemon vs QEMU's built-in virtio-blk: guest fio and vblk bench,
# 3 rounds of 8 s jobs (~20 min). Results in build/compare/results.{json,md,png}.
# COMPARE_ARGS="--quick" for a smoke run; see python3 bench/compare.py --help.
compare: deps
	$(PYTHON) bench/compare.py $(COMPARE_ARGS)

clean:
	rm -rf demo build *.egg-info .pytest_cache .mypy_cache .ruff_cache
