# remsh developer targets.  Each target sets up its own virtualenv in .venv
# (reused while the files it was built from are unchanged).
#
#   make demo    install the package and run the demonstration
#   make test    install the package and test tools; lint (ruff, mypy --strict,
#                import cycles); run the tests
#   make docs    build the Sphinx documentation into docs/_build/html
#   make bench   run the benchmarks (QUICK=1 for a short run)
#   make soak    random work for SOAK_MINUTES (default 30; QUICK=1: 3) under
#                cuts, freezes, refusals and kills; fails on any lost byte
#   make fuzz    the Hypothesis fuzz tests with many examples (FUZZ_EXAMPLES,
#                default 5000 a property: about ten minutes)
#   make clean   remove the virtualenv and build output

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# --durations: the slowest tests named at the end of every run (the suite must stay under ten minutes)
PYTEST_ARGS ?= --durations=25
# The suite mostly waits (on processes, sockets, time limits), so it runs in
# parallel worker processes (pytest-xdist: three, on two CPUs the timing tests
# keep their margins); PYTEST_WORKERS=0 runs it in one.  worksteal: a worker
# that runs out takes tests queued on another, so the run has no long tail.
PYTEST_WORKERS ?= 3

# Stamp files: a step runs again only when one of its inputs is newer.
STAMP_VENV  := $(VENV)/.stamp-venv
STAMP_PKG   := $(VENV)/.stamp-package
STAMP_TEST  := $(VENV)/.stamp-test
STAMP_DOCS  := $(VENV)/.stamp-docs
STAMP_BENCH := $(VENV)/.stamp-bench
BENCH_REQS  := $(wildcard bench/requirements.txt)

.PHONY: all demo test lint pytest docs bench soak fuzz clean venv install

all: test

venv: $(STAMP_VENV)
install: $(STAMP_PKG)

$(STAMP_VENV):
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "error: '$(PYTHON) -m venv' is unavailable; on Debian/Ubuntu: apt-get install python3-venv" >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	@touch $@

$(STAMP_PKG): $(STAMP_VENV) setup.py setup.cfg pyproject.toml remsh/__init__.py
	$(PIP) install -q -e .
	@touch $@

$(STAMP_TEST): $(STAMP_PKG) requirements.txt requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	@touch $@

$(STAMP_DOCS): $(STAMP_PKG) docs/requirements.txt
	$(PIP) install -q -r docs/requirements.txt
	@touch $@

$(STAMP_BENCH): $(STAMP_TEST) $(BENCH_REQS)
	$(if $(BENCH_REQS),$(PIP) install -q -r $(BENCH_REQS))
	@touch $@

demo: $(STAMP_PKG)
	$(BIN)/python -m remsh.demo

# Lint and tests both run, so one report shows every problem; either failing
# fails the target.
test: $(STAMP_TEST)
	@status=0; \
	$(MAKE) --no-print-directory lint || status=1; \
	$(MAKE) --no-print-directory pytest || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED (see the lint and test output above)" >&2; fi; \
	exit $$status

# ruff, mypy --strict, the import-cycle and private-access checks; each runs, so one report
# shows every problem.
lint: $(STAMP_TEST)
	@status=0; \
	echo "$(BIN)/ruff check remsh tests"; $(BIN)/ruff check remsh tests || status=1; \
	echo "$(BIN)/mypy --strict remsh"; $(BIN)/mypy --strict remsh || status=1; \
	echo "$(BIN)/python tests/check_import_cycles.py remsh"; $(BIN)/python tests/check_import_cycles.py remsh || status=1; \
	echo "$(BIN)/python tests/check_private_access.py remsh"; $(BIN)/python tests/check_private_access.py remsh || status=1; \
	exit $$status

# pytest exits 5 when it collected no test: that is a failure here, loudly.
pytest: $(STAMP_TEST)
	@echo "$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)"
	@$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$rc

docs: $(STAMP_DOCS)
	$(BIN)/sphinx-build -E -W --keep-going -b html docs docs/_build/html
	@echo "documentation: docs/_build/html/index.html"

bench: $(STAMP_BENCH)
	$(BIN)/python bench/run.py $(if $(QUICK),--quick)
	$(BIN)/python bench/streamfloor.py $(if $(QUICK),--size 32 --runs 2)
	$(BIN)/python bench/resume.py $(if $(QUICK),--resumes 10 --cut-every 0.5 --min-cuts 3)
	$(BIN)/python bench/cliprint.py $(if $(QUICK),--quick)
	$(BIN)/python bench/aio.py $(if $(QUICK),--quick)
	$(BIN)/python bench/aio.py --transport tcp $(if $(QUICK),--quick)
	$(BIN)/python bench/store.py $(if $(QUICK),--slaves 10 --chunks 20)
	$(BIN)/python bench/multimaster.py $(if $(QUICK),--slaves 150 --runs 2)

# the soak uses the test suite's relay and the test tools (cryptography for TLS)
soak: $(STAMP_TEST)
	$(BIN)/python bench/soak.py $(if $(QUICK),--minutes 3,$(if $(SOAK_MINUTES),--minutes $(SOAK_MINUTES)))

FUZZ_EXAMPLES ?= 5000
fuzz: $(STAMP_TEST)
	REMSH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider -o faulthandler_timeout=0 \
	  tests/test_fuzz.py tests/test_fuzz_readers.py

clean:
	rm -rf $(VENV) docs/_build build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
