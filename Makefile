# Two commands do all set-up on a fresh machine:
#   make run    set up the virtual environment, then run the demo workflow on the embedded sample archive
#   make test   set up the virtual environment, then run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled

$(BIN)/sarlang: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: a looser requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# lmms-eval's task loader, for the test that loads our exported task with it; --no-deps: its full
	# install pulls torchvision (which does not load beside this torch), wandb, opencv and spacy
	$(BIN)/pip install --quiet --no-deps lmms-eval==0.7.3 loguru==0.7.3 tenacity==9.2.1 evaluate==0.4.6 \
		sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3 pytz
	touch $(BIN)/sarlang

# headless Chromium for the viewer's browser test (tests/test_view.py): Debian's packages, installed only when the
# driver is missing; selenium is pointed at /usr/bin/chromedriver (no selenium-manager downloads)
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMEDRIVER):
	$(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver \
		|| ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver)

setup: $(BIN)/sarlang $(CHROMEDRIVER)

run: setup
	$(BIN)/sarlang run workflows/demo.yaml

# the linter and the type checker over everything (their settings: pyproject.toml; mypy's cache in .mypy_cache,
# ignored by git)
LINTED := sarlang_ray tests benchmarks
MYPY := $(BIN)/mypy --cache-dir .mypy_cache
style: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

lint: style
	$(MYPY)

# The linter and the formatter's check first (seconds): a test run starts only on code that passes them. Then
# the `serial` tests (they interrupt or kill something at a chosen moment) with no other Ray beside them; they
# keep ~0.7 of the 2 cores busy, so one process beside them runs the type checker (~40 s of one core), then
# the tier that needs no Ray (in two processes, the serial tests' reference run took 109 s instead of 22; with
# mypy as a third, 49 s). The serial tests' output follows; any failure of the three stops `make test` there.
# Then everything else over both cores (pytest-xdist: each worker its own Ray and demo run, the trained
# demo's tests on one worker, the slow tests handed out first: tests/conftest.py)
test: setup style
	@log=$$(mktemp); \
	$(BIN)/python -m pytest -q -m serial --durations=10 tests > $$log 2>&1 & serial=$$!; \
	$(MYPY); typed=$$?; \
	SARLANG_TEST_TIER=fast $(BIN)/python -m pytest -q -m "fast and not serial" tests; fast=$$?; \
	wait $$serial; rc=$$?; echo "== the serial tests, run beside mypy and the fast tier:"; cat $$log; \
	rm -f $$log; [ $$typed -eq 0 ] && [ $$fast -eq 0 ] && [ $$rc -eq 0 ]
	$(BIN)/python -m pytest -q -m "not serial and not fast" -n 2 --dist loadgroup --durations=25 tests

# the tier with no Ray, no demo run and no server (marked in tests/conftest.py): minutes, for quick feedback
test-fast: setup
	SARLANG_TEST_TIER=fast $(BIN)/python -m pytest -q -m fast -n 2 --durations=10 tests

bench: setup
	$(BIN)/python benchmarks/bench_tiling.py

.PHONY: setup style lint run test test-fast bench
