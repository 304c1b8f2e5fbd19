# The two fresh-machine commands: `make demo` (the main job end to end) and `make test`.
# Every install goes through constraints.txt, the exact stack CI tests (see README "Installation").
PY ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: install test demo lint bench lock

$(BIN)/unisteer: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(PIP) install -c $(CONSTRAINTS) --upgrade pip
	# torch first and pinned: the CPU build; any other version pulls gigabytes of CUDA packages.
	$(PIP) install -c $(CONSTRAINTS) torch
	$(PIP) install -c $(CONSTRAINTS) -e ".[test]"
	touch $(BIN)/unisteer

install: $(BIN)/unisteer

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench examples

demo: install
	$(BIN)/unisteer run configs/demo.yaml

bench: install
	$(BIN)/python bench/bench_training.py
	$(BIN)/python bench/bench_sweep.py

# Re-resolve constraints.txt from the newest releases pyproject.toml admits; run .ci/run before committing it.
lock:
	.ci/lock
