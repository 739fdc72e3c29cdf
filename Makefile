# Two commands for a fresh machine (see README):
#   make demo   install, then run the whole pipeline on the embedded digits data (offline)
#   make test   install with test extras, then run the test suite
PYTHON ?= python3

.PHONY: install install-dev demo test bench

install:
	$(PYTHON) -m pip install -e .

install-dev:
	$(PYTHON) -m pip install -e ".[dev]"

demo: install
	simclrv2 demo

test: install-dev
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) -m pip install -e ".[bench]"
	$(PYTHON) benchmarks/throughput.py --quick
