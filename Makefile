# The two commands of the README:
#   make        set up .venv and run the main job
#   make test   run the whole test suite
SHELL := /bin/bash
PY    := .venv/bin/python
VENV  := .venv/.installed

.PHONY: all setup test bench bench-quick clean

all: bench

setup: $(VENV)

# torch goes in first and pinned, so that no other package can pull a CUDA build.
$(VENV): requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

test: $(VENV)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q tests

bench: $(VENV)
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_lora_linear.py

bench-quick: $(VENV)
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_lora_linear.py --quick

clean:
	rm -rf .venv .pytest_cache .hypothesis
