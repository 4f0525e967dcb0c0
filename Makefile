# `make test`: everything from a fresh clone — venv, pinned dependencies, the compiled
# extension (CUDA kernels too where torch and nvcc allow), then the test suite.
# `make bench`: the same set-up, then the benchmarks and their summary table.
# `make mutation`: the same set-up, then mutation testing (cosmic-ray) of the evaluation, the losses
# and the CaDIS label tables, one session per mutation/*.toml (hours on 2 cores; not part of CI).
# `make demo`: the same set-up, then `mtseg demo`: baseline / +HOG / +presence-sync (/ recursive
# approximation) UNets trained and compared on the embedded HC18 sample, CPU, report in runs/demo.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
# nvcc lives here on the project's machines; an explicit CUDA_HOME wins.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
PYTEST_ARGS ?=
DEMO_ARGS ?=

MUTATION ?= labels losses metrics evaluate
MUTATION_DIR := build/mutation

.PHONY: test bench demo build clean mutation

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-ci.txt | $(PY)
	@echo "installing the pinned requirements (log: $(VENV)/install.log)"
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install -r requirements-ci.txt; } > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "make: installing the requirements failed"; exit 1; }
	@touch $@

build: $(DEPS_STAMP)
	@mkdir -p build
	@echo "building the extension (log: build/install.log)"
	@$(PY) -m pip install --no-build-isolation --no-deps -v -e . > build/install.log 2>&1 \
		|| { tail -n 60 build/install.log; echo "make: building the extension failed"; exit 1; }
	@grep -h "mtseg-kernels: building" build/install.log | tail -n 1
	$(PY) -c "import mtseg_kernels; print('mtseg_kernels backends:', mtseg_kernels.backends())"

# pytest exits 5 when it collected nothing: treat that as a failure, not a pass.
test: build
	@$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

bench: build
	@mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks -o python_files='bench_*.py' --benchmark-only \
		--benchmark-json=benchmarks/results/latest.json $(PYTEST_ARGS)
	$(PY) benchmarks/summarize.py benchmarks/results/latest.json

# cosmic-ray mutates the source files in place, one mutant at a time, and restores them;
# do not edit the tree while it runs. Survivors: cr-report --surviving-only --show-diff <db>.
mutation: build
	@mkdir -p $(MUTATION_DIR)
	@set -e; for m in $(MUTATION); do \
		db=$(MUTATION_DIR)/$$m.sqlite; rm -f $$db; \
		$(VENV)/bin/cosmic-ray init mutation/$$m.toml $$db; \
		if grep -q line-filter mutation/$$m.toml; then $(VENV)/bin/cr-filter-lines --config mutation/$$m.toml $$db; fi; \
		$(VENV)/bin/cosmic-ray exec mutation/$$m.toml $$db; \
		echo "== $$m"; $(VENV)/bin/cr-report $$db | tail -n 3; \
	done
	@git diff --quiet -- harness || { echo "make mutation: the source differs from git after the run"; exit 1; }

demo: build
	$(VENV)/bin/mtseg demo $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info mtseg_kernels/_C*.so .pytest_cache .benchmarks
