# The two commands of the README: `make run` (main job) and `make test` (test suite).
# Both run the idempotent set-up first (apt packages, .venv, horovod build, editable install).
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 4
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: setup run test bench mutation clean-runs
setup:
	@bash scripts/setup_env.sh

run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" scripts/mpirun.sh -np $(NP) $(PY) -m loft_hpc.run --config $(CONFIG) $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs tests $(ARGS)

bench: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) tools/bench.py $(ARGS)

# Mutation testing of the pure modules against the fast single-process tests (outside CI; see
# tools/mutation_report.py and [mutmut] in setup.cfg). Works on a copy in build/mutation/.
MUTMUT_VERSION ?= 3.8.1
mutation: setup
	$(PY) -m pip install -q 'mutmut==$(MUTMUT_VERSION)'
	OMP_NUM_THREADS=1 $(PY) tools/mutation_report.py $(ARGS)

clean-runs:
	rm -rf runs
