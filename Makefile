# The two commands of the README, each self-contained on a fresh machine:
#   make demo       - creates .venv, installs mmjax, runs the embedded demo
#   make test       - creates .venv, installs mmjax with its test and tpu extras (libtpu: the
#                     tests compile the train step for TPU slices with TPU's own compiler),
#                     runs every test (what CI runs)
# and, for every edit:
#   make test-fast  - the same without the end-to-end tests (pytest -m "not e2e")
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_DEVICES ?= 8
export XLA_FLAGS ?= --xla_force_host_platform_device_count=$(CPU_DEVICES)
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: demo test test-fast install install-test clean browser

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

# lmms-eval's API (its model base class, request type and registry) without its GPU stack:
# what the adapter's test needs; `pip install 'mmjax[lmms]'` installs the real thing.
LMMS_API = lmms-eval==0.7.3 loguru==0.7.3 pytz==2026.6

# apache-beam 2.78 asks for protobuf<7, but transformers 5.24 reads sentencepiece models only
# with protobuf >= 7.36 (its generated code); Beam runs on 7.36 (tests/test_beam.py): re-pinned
$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,tpu]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(LMMS_API)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps protobuf==7.36.2
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

# The demo trains a tiny model: 2 CPU devices (data parallel) run it faster than 8.
demo: $(VENV)/.base
	XLA_FLAGS=--xla_force_host_platform_device_count=2 $(PY) -m mmjax.demo

# two pytest processes, a test file each at a time (a module's fixtures are built once);
# compiled programs are kept in .cache/jax-tests between runs (tests/conftest.py)
PYTEST = $(PY) -m pytest -q -n 2 --dist loadfile

# the chat page's test drives Debian's chromium: installed when missing (as root, or sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; }; }

test: $(VENV)/.test browser
	$(PYTEST) --durations=25 tests

test-fast: $(VENV)/.test
	$(PYTEST) --durations=15 -m "not e2e" tests

clean:
	rm -rf $(VENV) .pytest_cache .cache
