# Two entry points, both creating (or reusing) $(VENV):
#   make demo  - run the main job (jobs/benchmark.py) on the embedded synthetic road suite
#   make test  - run the test suite
# The ordinary PyPI torch is installed (a CUDA build that also runs on CPU). To keep a torch you already have
# (e.g. on a GPU node), use: make VENV_FLAGS=--system-site-packages test  (pip keeps any torch>=2.4 it finds).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.oodseg-installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/benchmark.py

# two pytest-xdist workers, a test module on one worker (its fixtures shared): Ray start-ups and process waits of
# one overlap the other's work on 2 cores; each worker has its own session Ray (tests/conftest.py)
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/metrics.py
	$(PY) benchmarks/models.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) results .cache
