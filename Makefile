# The two commands of the README: `make run` (main job) and `make test` (test suite).
# Both run the idempotent set-up first (apt packages, .venv, horovod build, editable install).
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 4
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: setup run test bench clean-runs
setup:
	@bash scripts/setup_env.sh

run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" scripts/mpirun.sh -np $(NP) $(PY) -m loft_hpc.run --config $(CONFIG) $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs tests $(ARGS)

bench: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) tools/bench_loft.py $(ARGS)

clean-runs:
	rm -rf runs
