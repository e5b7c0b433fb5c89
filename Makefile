# Two commands do all the set-up on a fresh machine:
#   make demo   - create the environment if missing, then run the main job
#   make test   - create the environment if missing, then run the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo quickstart test env browser lint bench-quick clean-env

$(VENV)/.installed: pyproject.toml examples/plugin-template/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet -e examples/plugin-template
	touch $@

env: $(VENV)/.installed

# the Gradio demo on the committed default bundle (http://127.0.0.1:7860)
demo: $(VENV)/.installed
	$(PY) -m tessera.apps.cli demo

# trains a small image tokenizer for a few minutes and writes a reconstruction grid
quickstart: $(VENV)/.installed
	$(PY) -m tessera.apps.quickstart --out out/quickstart

# Headless Chromium for tests/test_browser.py: installed when missing, where we may (as root, as in CI).
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: $(VENV)/.installed browser
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench-quick: $(VENV)/.installed
	$(PY) benchmarks/quantizers.py --quick

clean-env:
	rm -rf $(VENV)
