# disaggctl: the two set-up commands (see README.md).
#   make demo   - install, then run a real prefill/decode pair + router on this machine (CPU)
#   make test   - install everything the tests use, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install test-deps lint bench clean-demo

install:
	scripts/bootstrap.sh $(VENV)

test-deps:
	scripts/install-test-deps.sh

demo: install
	scripts/demo.sh

test: install test-deps
	scripts/stop-test-infra.sh
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check disaggctl tests bench
	$(VENV)/bin/mypy disaggctl

bench: install
	$(PY) bench/plan_scale/run.py
	$(PY) bench/router/run.py
	$(PY) bench/apply_fanout/run.py
	$(PY) bench/input_bounds/run.py

clean-demo:
	$(VENV)/bin/disaggctl destroy examples/local-cpu.yaml -y
