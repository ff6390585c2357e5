# medalign: `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU wheel of torch is pinned and installed first, so nothing pulls a CUDA build.
# On a machine that already has a CUDA torch, `make venv TORCH_SPEC=` keeps it (use --system-site-packages).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# `make demo VERTICAL=ad` (or cxr) runs one vertical only.
VERTICAL ?= all

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps nilearn
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh $(VERTICAL)

test: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs data
