# XO: the two commands of the README are `make demo` and `make test`. Both set up everything
# first (scripts/setup.sh is idempotent), as root on Debian 12.
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest

.PHONY: setup demo test lint proto proto-check test-unit test-net test-kernel bench clean

setup:
	scripts/setup.sh

demo: setup
	.venv/bin/xo demo

# The whole suite: lint, generated-code staleness, unit, net (root, namespaces), kernel (VM).
test: setup lint proto-check test-unit test-net test-kernel

lint:
	.venv/bin/ruff check --output-format concise xo tests integrations
	.venv/bin/mypy xo

proto:
	scripts/gen-proto.sh

proto-check:
	scripts/gen-proto.sh --check

test-unit:
	$(PYTEST) tests/unit

test-net:
	$(PYTEST) tests/net -m "not kernel"

# Boots Debian's stock kernel with virtme-ng and runs `pytest -m kernel` inside one boot.
test-kernel:
	scripts/kernel-tier.sh

bench: setup
	.venv/bin/xo bench

clean:
	rm -rf .venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
