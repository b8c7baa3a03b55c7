# The commands: `make run`, `make test` (the fast tests, generated data only) and `make test-all`
# (everything: slow tests too, and the real-data tests, which skip with their reason when the data
# sets are not in $BIGMODEL_SHARED_DATA or ../shared/data). All create .venv on first use and reinstall
# the project only when pyproject.toml changed (the stamp file records the last install).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx,tensorboard]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/bigmodel run $(ARGS)

# two pytest-xdist workers, one per core: each test runs torch on one thread (tests/conftest.py), so the
# fast suite takes 127-133 s here instead of 184-195 s; test-all stays in one process (its slow tests start
# process groups, torchrun and signals of their own)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not realdata" $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -c "import transformers, lightly" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/peers.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
