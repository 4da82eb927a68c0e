# Two entry points a new user needs: `make run` (set up + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test setup lint smoke clean

$(BIN)/kd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip -q
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(BIN)/kd

setup: $(BIN)/kd

run: setup  ## set up and run the main job (embedded CIFAR-10 subset)
	$(BIN)/kd train $(ARGS)

smoke: setup  ## all stages on a tiny preset, seconds on a CPU
	$(BIN)/kd train experiment=smoke $(ARGS)

test: setup  ## set up and run the test suite
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check kdcli tests scripts

clean:
	rm -rf outputs multirun kd-store .pytest_cache
