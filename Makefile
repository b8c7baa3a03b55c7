# The two commands: `make run` and `make test`. Both create .venv on first use and reinstall the
# project only when pyproject.toml changed (the stamp file records the last install).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx,tensorboard]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/bigmodel run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -c "import transformers, lightly" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/peers.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
