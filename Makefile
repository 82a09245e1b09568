# The two commands of the README: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data/default
NPROC ?= 2

.PHONY: setup data train test test-all test-slurm test-multinode reproduce clean

# One id for the whole `make train` invocation: its run directory is runs/$(RUN_ID).
ifndef RUN_ID
RUN_ID := train-$(shell date +%Y%m%d-%H%M%S)
endif
RUN_DIR := runs/$(RUN_ID)

setup: $(VENV)/.installed

# torch first, pinned, from the local CPU wheel; then the rest under the same pin so that no
# dependency can replace it with a CUDA build. No build isolation: deepspeed builds against the
# installed torch instead of downloading another one.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[dev]'
	touch $@

data: setup
	$(PY) -m data_tools build-default --out $(DATA_DIR)

# The main job: tiny n=4 model, default code+text mixture, FSDP over $(NPROC) CPU ranks, then a
# sample from the trained model (speculative sampling with its own heads: exact in distribution;
# a few CPU minutes of training make a weak model, whose greedy output just repeats itself).
train: data
	MTP_RUN_ID=$(RUN_ID) OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) \
		-m mtp_pretrain.train parallel=fsdp $(ARGS)
	@echo "--- a sample from the trained model ($(RUN_DIR)/checkpoints) ---"
	$(PY) -m mtp_pretrain.inference.cli $(RUN_DIR)/checkpoints --mode self_speculative \
		--temperature 0.8 --top-p 0.95 --seed 0 \
		--prompt "def read_config(path):" --prompt "And it came to pass" --max-new-tokens 64
	@echo "--- outputs ---"
	@echo "metrics:     $(RUN_DIR)/metrics.jsonl   (plot: $(VENV)/bin/mtp-plot $(RUN_DIR))"
	@echo "checkpoints: $(RUN_DIR)/checkpoints"
	@echo "wandb:       $(RUN_DIR)/wandb   (offline without an API key; upload: wandb sync $(RUN_DIR)/wandb/offline-run-*)"

# make test: everything but the cells marked slow (the rest of the strategy x model-shape matrix,
# compile); make test-all: all of it (run it before resolving parallelism or model changes).
test: setup
	$(PY) -m pytest -q -x -m "not slow and not slurm and not multinode" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q -x -m "not slurm and not multinode" $(PYTEST_ARGS)

test-slurm: setup
	bash tests/slurm/run_slurm_test.sh

# A 3-node SLURM cluster of network namespaces on this machine, the real trainer across nodes
# (needs root; skips with one line without it). docs/slurm.md "Multi-node".
test-multinode: setup
	bash tests/multinode/run_multinode_test.sh

reproduce: setup
	$(PY) -m bench.reproduce

clean:
	rm -rf $(VENV) outputs runs
