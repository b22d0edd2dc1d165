# Set-up, demo, tests and training; every target creates or reuses .venv.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DATA_DIR ?= $(HOME)/data
TRAIN_ARGS ?=
export DATA_DIR

.PHONY: prepare demo demo-data test train download-dataset benchmark

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

prepare: $(VENV)/.installed  ## install only

demo-data: prepare  ## write the synthetic Clotho-format dataset to $(DATA_DIR)/clotho_demo if absent
	$(PYTHON) -m data_loaders.demo_data --data-dir "$(DATA_DIR)" --if-missing

demo: demo-data  ## train and evaluate the CPU demo (about 6 minutes on 2 cores)
	$(PYTHON) -m experiments.ex_dcase24 with demo "directories.data_dir=$(DATA_DIR)"

test: prepare  ## the test suite
	$(PYTHON) -m pytest -q

train: prepare  ## the memory-lean single-GPU recipe; TRAIN_ARGS="key=value ..." overrides
	$(PYTHON) -m experiments.ex_dcase24 with lean_single_gpu "directories.data_dir=$(DATA_DIR)" $(TRAIN_ARGS)

download-dataset: prepare  ## Clotho v2.1 (+ the published Phi-4 captions) into $(DATA_DIR)/clotho_v2
	scripts/download_clothov2.sh --data-dir "$(DATA_DIR)" --with-phi4-captions

benchmark: prepare  ## throughput and evaluation time; figures go to benchmarks/RESULTS.md by hand
	$(PYTHON) -m benchmarks.bench_stage1
