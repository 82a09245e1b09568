# The two commands of the README: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data/default
NPROC ?= 2

.PHONY: setup data train test test-fast test-slurm bench clean

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

train: data
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m mtp_pretrain.train $(ARGS)

test: setup
	$(PY) -m pytest -q -x $(PYTEST_ARGS)

test-slurm: setup
	bash tests/slurm/run_slurm_test.sh

clean:
	rm -rf $(VENV) outputs runs
