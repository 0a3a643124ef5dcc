# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv if absent, install hasten, run the demos (2 processes) and the big-model example
#   make test   - create .venv if absent, install hasten with its test extra, run ruff, the tests and mypy
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0

$(VENV)/.hasten: $(PY) pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.hasten-test: $(VENV)/.hasten
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.hasten-bench: $(VENV)/.hasten
	$(PIP) -e '.[bench]'
	touch $@

demo: $(VENV)/.hasten
	$(PY) -m hasten launch --cpu --num_processes 2 examples/quickstart.py
	$(PY) -m hasten launch --cpu --num_processes 2 examples/train.py
	$(PY) -m hasten launch --cpu --num_processes 2 examples/train.py --resume
	$(PY) examples/big_model_inference.py

test: $(VENV)/.hasten-test
	$(PY) -m ruff check src tests bench examples
	$(PY) -m ruff format --check src tests bench examples
	$(PY) -m pytest -q tests
	$(PY) -m mypy

bench: $(VENV)/.hasten-bench
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info
