# The two commands of the README:
#   make        set up .venv, execute every chapter and build the book (warnings are errors)
#   make test   the whole suite: unit tests, nbval, the book build, a real browser on the site
SHELL := /bin/bash
PY    := .venv/bin/python
VENV  := .venv/.installed
# Plotly >= 6 figures vanish from a Jupyter Book 1 build without this renderer.
export PLOTLY_RENDERER := notebook_connected
# Pin threads so that nbval runs are reproducible and fit a 2-core machine.
export OMP_NUM_THREADS := 2
# OpenMP threads spin a bounded while before they sleep. Spinning without bound slows a chapter's
# training loop up to tenfold on a loaded machine; sleeping at once (OMP_WAIT_POLICY=PASSIVE) halves
# its speed on an idle one. 10 QLoRA steps of the tiny model, 2 threads, measured: idle 0.47 s
# (this setting) against 1.0 s passive; with two busy processes beside it 1.05 s.
export GOMP_SPINCOUNT := 100000
# MKL takes exactly OMP_NUM_THREADS threads, not fewer when the machine is busy: the same product
# then sums in the same order from one call to the next.
export MKL_DYNAMIC := FALSE
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# Training loops show a progress bar to live readers only, never in committed or checked outputs.
export LORA_BOOK_QUIET := 1

NOTEBOOKS := $(wildcard notebooks/*.ipynb) book/errata.ipynb

.PHONY: all setup book book-committed serve execute text test unit lint nbval browser pdf bench bench-quick assignments clean

all: book assignments
	@echo
	@echo "The book is built: open _build/html/index.html, or run 'make serve' for http://127.0.0.1:8000"

setup: $(VENV)

# torch goes in first and pinned, so that no other package can pull a CUDA build.
$(VENV): requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

book: $(VENV)
	.venv/bin/jupyter-book build . --all -W -n --keep-going

serve:
	@test -d _build/html || { echo "no _build/html: run 'make' first"; exit 1; }
	$(PY) -m http.server --bind 127.0.0.1 --directory _build/html 8000

# Re-execute every notebook in place (refreshes the committed outputs), then write their text twins.
execute: $(VENV)
	$(PY) tools/execute_notebooks.py $(NOTEBOOKS)
	$(PY) tools/notebook_text.py

# The chapters as MyST text (text/...md), for diffs: `make text` after editing a notebook;
# `$(PY) tools/notebook_text.py --to-notebooks` after editing the text.
text: $(VENV)
	$(PY) tools/notebook_text.py

# ruff ([tool.ruff] in pyproject.toml), and the text twins in step with their notebooks.
LINTED := lora_ref tests tools benchmarks book/_ext
lint: $(VENV)
	.venv/bin/ruff check $(LINTED)
	$(PY) tools/notebook_text.py --check

# The fast unit tests, on 2 workers (pytest-xdist). The slow ones (marked `slow`: otter-grader, the
# hub path, the export, the benchmarks) and the browser test, which needs a built book, run in make test.
unit: $(VENV)
	$(PY) -m pytest -q -n 2 -m "not slow" tests --ignore=tests/browser --ignore=tests/pdf

# nbval compares the outputs of the cells tagged nbval-check-output with the committed ones.
NBVAL := $(PY) -m pytest -q -p no:randomly --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg
# The second pass is plain nbval as a maintainer's CI runs it: none of this Makefile's exports (no
# LORA_BOOK_QUIET, no thread pinning), no CI variable, no sanitizer; and another SIMD path on one
# thread, so that checked outputs depend neither on the CPU nor on the environment. One thread each, so
# two notebooks run at once (xdist, each notebook whole on one worker: its cells share a kernel).
PLAIN_NBVAL := env -u PLOTLY_RENDERER -u OMP_NUM_THREADS -u GOMP_SPINCOUNT -u MKL_DYNAMIC \
	-u PYDEVD_DISABLE_FILE_VALIDATION -u LORA_BOOK_QUIET -u CI \
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:randomly --nbval-lax -n 2 --dist loadfile

nbval: $(VENV)
	$(NBVAL) $(NOTEBOOKS)
	$(PLAIN_NBVAL) $(NOTEBOOKS)

browser: $(VENV)
	$(PY) -m pytest -q -n 2 tests/browser

# make test builds the site from the committed outputs: the two nbval passes have just executed every
# notebook again and compared its checked cells with them, and the browser test then checks the pages
# readers of the committed notebooks get. `make` (book) re-executes every notebook for the published
# site. Executing a third time here would cost five of make test's minutes on a 2-core machine.
test: $(VENV)
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q -n 2 tests --ignore=tests/browser --ignore=tests/pdf
	$(NBVAL) $(NOTEBOOKS)
	$(PLAIN_NBVAL) $(NOTEBOOKS)
	$(MAKE) --no-print-directory book-committed
	$(PY) -m pytest -q -n 2 tests/browser

book-committed: $(VENV)
	sed 's/^  execute_notebooks: .*/  execute_notebooks: "off"/' _config.yml > _config_committed.yml
	.venv/bin/jupyter-book build . --all -W -n --keep-going --config _config_committed.yml; \
	rc=$$?; rm -f _config_committed.yml; exit $$rc

# The PDF edition: the book as one page from the committed outputs, printed by chromium, then opened
# and checked with pypdf (tests/pdf). About 2 minutes; CI runs it after make test (.ci/run). A copy
# lands in _build/html/book.pdf, where the front page links to it.
pdf: $(VENV)
	$(PY) tools/build_pdf.py
	$(PY) -m pytest -q tests/pdf

# Classroom assignments (otter-grader) from the chapters' exercises and assignments/*.yml: a student
# notebook and an autograder zip per chapter under _build/assignments/<chapter>/ (book/instructors.md).
# The chapters and the book are only read. tests/test_assignments.py (in `make test`) grades them.
assignments: $(VENV)
	$(PY) tools/build_assignments.py

bench: $(VENV)
	$(PY) benchmarks/bench_lora_linear.py
	$(PY) benchmarks/bench_backward.py
	$(PY) benchmarks/bench_multi_adapter.py
	$(PY) benchmarks/bench_nf4.py

bench-quick: $(VENV)
	$(PY) benchmarks/bench_lora_linear.py --quick
	$(PY) benchmarks/bench_backward.py --quick
	$(PY) benchmarks/bench_multi_adapter.py --quick

clean:
	rm -rf .venv _build .pytest_cache .hypothesis
