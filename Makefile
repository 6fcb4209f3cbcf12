# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: demo test deps lint typecheck unit e2e bench-guest clean

demo: deps
	$(PYTHON) scripts/demo.py

test: deps lint typecheck
	$(PYTHON) -m pytest -v --durations=15

deps:
	bash scripts/install-deps.sh

lint:
	$(PYTHON) -m ruff check vblk tests tools scripts
	$(PYTHON) -m ruff format --check vblk tests tools scripts

typecheck:
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy --strict tools/guest.py

# Developer shortcuts.
unit:
	$(PYTHON) -m pytest -q -m "not e2e and not interop"

e2e:
	$(PYTHON) -m pytest -v tests/e2e

bench-guest: deps
	$(PYTHON) scripts/bench_guest.py

clean:
	rm -rf demo build *.egg-info .pytest_cache .mypy_cache .ruff_cache
