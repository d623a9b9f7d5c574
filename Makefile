# disaggctl: the two set-up commands (see README.md).
#   make demo   - install, then run a real prefill/decode pair + router on this machine (CPU)
#   make test   - install everything the tests use, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

# The test order is shuffled (pytest-randomly) with the seed printed first: every module must pass
# alone and in any order. The default seed is fixed so that a CI run can be replayed exactly; try
# other orders with `make test SEED=$$RANDOM` (the suite has passed under several seeds).
# --timeout: no single test (with its fixtures) may hang CI; --durations: where the time went.
SEED ?= 4242

.PHONY: demo test install test-deps lint lint-only bench clean-demo

install:
	scripts/bootstrap.sh $(VENV)
	@# byte-compile the package as a pip install would (PYTHONDONTWRITEBYTECODE=1 or a read-only checkout
	@# would otherwise recompile every module on each `disaggctl` start: ~60 ms)
	$(PY) -m compileall -q -j 0 disaggctl >/dev/null

test-deps:
	scripts/install-test-deps.sh

demo: install
	scripts/demo.sh

test: install test-deps
	$(MAKE) --no-print-directory lint-only
	scripts/stop-test-infra.sh
	@echo "pytest-randomly seed $(SEED): rerun this order with make test SEED=$(SEED)"
	$(PY) -m pytest -q -p randomly --randomly-seed=$(SEED) --timeout=900 --durations=25 tests

lint: install lint-only

lint-only:
	$(VENV)/bin/ruff check disaggctl tests bench
	$(VENV)/bin/mypy disaggctl

bench: install
	$(PY) bench/plan_scale/run.py
	$(PY) bench/router/run.py
	$(PY) bench/apply_fanout/run.py
	$(PY) bench/input_bounds/run.py
	$(PY) bench/cli_start/run.py
	$(PY) bench/sizing_reference/run.py
	$(PY) bench/unit_state/run.py
	$(PY) bench/rolling_change/run.py
	$(PY) bench/health_transport/run.py

clean-demo:
	$(VENV)/bin/disaggctl destroy examples/local-cpu.yaml -y
