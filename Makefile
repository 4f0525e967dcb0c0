# `make test`: everything from a fresh clone — venv, pinned dependencies, the compiled
# extension (CUDA kernels too where torch and nvcc allow), then the test suite.
# `make bench`: the same set-up, then the benchmarks and their summary table.
# `make mutation`: the same set-up, then mutation testing (cosmic-ray) of the evaluation, the losses
# and the CaDIS label tables, one session per mutation/*.toml (hours on 2 cores; not part of CI).
# `make demo`: the same set-up, then `mtseg demo`: baseline / +HOG / +presence-sync / recursive
# approximation UNets (configs/demo_*.yaml, 3 seeds each) trained on tiles of the embedded HC18
# sample and compared with the baseline, CPU, report in runs/demo (README: tools/demo_readme.py).
# `make sanitize`: the CPU kernels built with AddressSanitizer + UBSan (own folder), tests/ops
# (and tests/fuzz) run against that build; any sanitizer report fails it. CI runs it after `make test`.
# `make fuzz`: the raw-op fuzzers of tests/fuzz (also part of `make test` and `make sanitize`,
# with a small fixed set of examples) with FUZZ_EXAMPLES examples per fuzzer and fresh
# random inputs each run; a failure prints the example and how to replay it.
# `make sanitize SANITIZE_TESTS=tests/fuzz SANITIZE_FUZZ_EXAMPLES=500`: the same under ASan + UBSan.
# `make gpu-check`: on a GPU machine, tests/gpu, the GPU benchmarks and compute-sanitizer
# (memcheck, racecheck) over tests/gpu, then one summary table (results in build/gpu-check).
# `make ptxas-check`: registers and spills of every CUDA kernel, from the last build's ptxas reports.
#
# The extension is rebuilt only when something it is built from changed (sources, build
# files, the pinned requirements, the build settings below); the rebuild itself recompiles
# only the changed objects (ninja, in build/temp.*). So `make test` then `make demo` builds once.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
# nvcc lives here on the project's machines; an explicit CUDA_HOME wins.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
PYTEST_ARGS ?=
DEMO_ARGS ?=

EXT_STAMP := build/.ext-stamp
BUILD_SETTINGS := build/.build-settings
# Environment that changes what setup.py builds: a change rebuilds (ninja then decides what).
BUILD_VARS := MTSEG_BUILD_CUDA TORCH_CUDA_ARCH_LIST CUDA_HOME PYTORCH_NVCC CC CXX CFLAGS CXXFLAGS LDFLAGS
EXT_INPUTS := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml $(wildcard tools/ptxas_log.py)
# No extension module at all (deleted, `make clean`): build whatever the stamp says.
EXT_MISSING := $(if $(wildcard mtseg_kernels/_C*.so),,FORCE)

SANITIZE_DIR := build/sanitize
SANITIZE_TESTS := tests/ops $(wildcard tests/fuzz)
SANITIZE_ARGS ?=
# Examples per raw-op fuzzer (tests/fuzz/fuzzing.py): CI's fixed default, or more for a long search.
SANITIZE_FUZZ_EXAMPLES ?=
FUZZ_EXAMPLES ?= 2000

MUTATION ?= labels losses metrics evaluate
MUTATION_DIR := build/mutation

.PHONY: test bench demo build clean sanitize fuzz gpu-check ptxas-check mutation skimage-tests FORCE

$(PY):
	$(PYTHON) -m venv $(VENV)

# New files rather than rewritten ones (rm first): a venv copied with hard links shares
# these inodes with its original, which must not see this venv's log or stamp.
$(DEPS_STAMP): requirements-ci.txt | $(PY)
	@echo "installing the pinned requirements (log: $(VENV)/install.log)"
	@rm -f $(VENV)/install.log $@
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install -r requirements-ci.txt; } > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "make: installing the requirements failed"; exit 1; }
	@touch $@

# Rewritten only when a setting changed, so its date tells whether a rebuild is due.
$(BUILD_SETTINGS): FORCE
	@mkdir -p $(@D)
	@printf '%s\n' $(foreach v,$(BUILD_VARS),'$(v)=$($(v))') 'python=$(abspath $(PY))' > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

$(EXT_STAMP): $(DEPS_STAMP) $(EXT_INPUTS) $(BUILD_SETTINGS) $(EXT_MISSING)
	@mkdir -p build
	@echo "building the extension (log: build/install.log; a first CUDA build takes long, later ones only recompile what changed)"
	@start=$$(date +%s); $(PY) -m pip install --no-build-isolation --no-deps -v -e . > build/install.log 2>&1 \
		|| { tail -n 60 build/install.log; echo "make: building the extension failed"; exit 1; }; \
	grep -h "mtseg-kernels: building" build/install.log | tail -n 1; \
	echo "built in $$(( $$(date +%s) - start )) s"
	@$(PY) -c "import mtseg_kernels; print('mtseg_kernels backends:', mtseg_kernels.backends())"
	@touch $@

build: $(EXT_STAMP)
	@echo "mtseg_kernels._C is up to date (objects in build/temp.*, last build's log: build/install.log)"

# scikit-image's own test_hog.py, which tests/ops/test_hog.py runs in place against
# mtseg_kernels.hog: only the 0.25.2 wheel ships it (0.26's has no tests). Unpacked into the
# venv; without PyPI the step only warns, and that test skips with the reason.
SKIMAGE_TESTS := $(VENV)/skimage-tests
$(SKIMAGE_TESTS)/.stamp: | $(PY)
	@rm -rf $(SKIMAGE_TESTS) && mkdir -p $(SKIMAGE_TESTS)
	@$(PY) -m pip download scikit-image==0.25.2 --no-deps --only-binary :all: -d $(SKIMAGE_TESTS)/wheel \
		> $(SKIMAGE_TESTS)/download.log 2>&1 \
		&& $(PY) -c "import glob, sys, zipfile; zipfile.ZipFile(glob.glob(sys.argv[1] + '/wheel/*.whl')[0]).extract('skimage/feature/tests/test_hog.py', sys.argv[1])" $(SKIMAGE_TESTS) \
		&& rm -rf $(SKIMAGE_TESTS)/wheel && touch $@ \
		|| echo "make: could not fetch scikit-image 0.25.2's test_hog.py (log: $(SKIMAGE_TESTS)/download.log); its test will skip"

skimage-tests: $(SKIMAGE_TESTS)/.stamp

# pytest exits 5 when it collected nothing: treat that as a failure, not a pass.
test: build skimage-tests
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

ptxas-check: build
	@$(PY) tools/ptxas_check.py

# Own build folder and module (never the in-place _C); the tests load it via MTSEG_EXTENSION.
sanitize: $(DEPS_STAMP)
	@mkdir -p $(SANITIZE_DIR)
	@echo "building the extension with AddressSanitizer + UBSan (log: $(SANITIZE_DIR)/build.log)"
	@MTSEG_SANITIZE=1 MTSEG_BUILD_CUDA=0 $(PY) setup.py build_ext --build-temp $(SANITIZE_DIR)/temp \
		--build-lib $(SANITIZE_DIR)/lib > $(SANITIZE_DIR)/build.log 2>&1 \
		|| { tail -n 60 $(SANITIZE_DIR)/build.log; echo "make sanitize: building failed"; exit 1; }
	@$(if $(SANITIZE_FUZZ_EXAMPLES),MTSEG_FUZZ_EXAMPLES=$(SANITIZE_FUZZ_EXAMPLES) MTSEG_FUZZ_RANDOM=1) \
		$(PY) tools/sanitize.py --extension-dir $(SANITIZE_DIR)/lib -- $(SANITIZE_TESTS) $(SANITIZE_ARGS)

fuzz: build
	MTSEG_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) MTSEG_FUZZ_RANDOM=1 $(PY) -m pytest tests/fuzz -p no:cacheprovider \
		--hypothesis-show-statistics $(PYTEST_ARGS)

# Asks nvidia-smi first, so that a machine without a GPU is told so at once instead of
# after a full build; tools/gpu_check.py then asks torch.
gpu-check:
	@if ! nvidia-smi -L > /dev/null 2>&1; then \
		echo "gpu-check: no NVIDIA GPU here (nvidia-smi lists none): nothing to check. Run it on a machine with a CUDA GPU."; \
		exit 0; \
	fi; \
	$(MAKE) --no-print-directory build && $(PY) tools/gpu_check.py --out build/gpu-check

FORCE:

clean:
	rm -rf build *.egg-info mtseg_kernels/_C*.so .pytest_cache .benchmarks
