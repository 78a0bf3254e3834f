# Two commands on a fresh machine (no GPU needed):
#   make train   installs everything, then trains Omniglot 5-way 1-shot and prints held-out accuracy
#   make test    installs everything, then runs the test suite
PYTHON ?= python3
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME

.PHONY: install train test bench
install: .install-stamp
.install-stamp: setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*)
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install -e . --no-build-isolation --no-deps
	touch $@

train: install
	$(PYTHON) -m maml_fast train --preset omniglot-5w1s-cpu --time-limit 8

test: install
	$(PYTHON) -m pytest tests -q

bench: install
	$(PYTHON) -m benchmarks.bench_table
