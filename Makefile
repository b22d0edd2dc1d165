# Set-up, demo, tests and training; every target creates or reuses .venv.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DATA_DIR ?= $(HOME)/data
TRAIN_ARGS ?=
UV_VERSION := 0.13.8
UV := .tools/bin/uv
export DATA_DIR
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))

.PHONY: prepare lock demo demo-data demo-stage2 test train download-dataset benchmark

$(UV):  ## uv itself, in its own small virtualenv (works where the system Python refuses pip installs)
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

# --compile-bytecode: imports read precompiled .pyc files even where PYTHONDONTWRITEBYTECODE is set (as on the
# development machine), which cuts each new Python process's start from ~18 s to ~7 s on 2 cores.
$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --frozen --extra dev --python python3 --compile-bytecode
	touch $@

prepare: $(VENV)/.installed  ## install exactly the versions pinned in uv.lock

lock: $(UV)  ## after editing pyproject.toml: re-resolve uv.lock and re-export requirements.lock.txt (conda)
	$(UV) lock --python python3
	$(UV) export --frozen --extra dev --no-hashes --no-emit-project --no-header -o requirements.lock.txt

demo-data: prepare  ## write the synthetic Clotho-format dataset to $(DATA_DIR)/clotho_demo if absent
	$(PYTHON) -m data_loaders.demo_data --data-dir "$(DATA_DIR)" --if-missing

demo: demo-data  ## train and evaluate the CPU demo (about 4 minutes on 2 cores)
	$(PYTHON) -m experiments.ex_dcase24 with demo "directories.data_dir=$(DATA_DIR)"

demo-stage2: demo-data  ## stage 1, its embeddings and stage 2 (salsa's keys) on the demo data
	$(PYTHON) -m experiments.ex_dcase24 with demo "directories.data_dir=$(DATA_DIR)"
	run=$$(ls -td "$(DATA_DIR)"/runs/*/ | head -1) && \
	$(PYTHON) -m experiments.ex_dcase24 cmd_generate_embeddings with demo "directories.data_dir=$(DATA_DIR)" \
		"load_parameters=$$run" && \
	$(PYTHON) -m experiments.ex_dcase24 with demo "directories.data_dir=$(DATA_DIR)" "load_parameters=$$run" \
		load_last=best loss_weight=0.0 distill_weight=1.0 "distill_from=$$run" seed=523528930

test: prepare  ## the test suite
	$(PYTHON) -m pytest -q

train: prepare  ## the memory-lean single-GPU recipe; TRAIN_ARGS="key=value ..." overrides
	$(PYTHON) -m experiments.ex_dcase24 with lean_single_gpu "directories.data_dir=$(DATA_DIR)" $(TRAIN_ARGS)

download-dataset: prepare  ## Clotho v2.1 (+ the published Phi-4 captions) into $(DATA_DIR)/clotho_v2
	scripts/download_clothov2.sh --data-dir "$(DATA_DIR)" --with-phi4-captions

benchmark: prepare  ## this machine's speed: model step per lever, loader and its parts, TAP scoring (RESULTS.md by hand)
	$(PYTHON) -m benchmarks.bench_stage1 step
	$(PYTHON) -m benchmarks.bench_loader --parts
	$(PYTHON) -m benchmarks.bench_tap_scoring
