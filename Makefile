# Two entry points for a fresh machine:
#   make demo   -- set up .venv and run the embedded default (train + audit a tiny DDPM on digits, CPU)
#   make test   -- set up .venv (with the dev extra) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# torch/torchvision pinned to the wheels this platform serves; pip's constraints file may cap them further.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
OUT    ?= demo-out

.PHONY: venv dev demo test bench clean

$(VENV)/.core-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev-stamp: $(VENV)/.core-stamp
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.core-stamp
dev: $(VENV)/.dev-stamp

demo: $(VENV)/.core-stamp
	$(VENV)/bin/diffaudit demo --out $(OUT)

test: $(VENV)/.dev-stamp
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -ra

bench: $(VENV)/.dev-stamp
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
