# `make demo` and `make test` build the virtual environment from nothing, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv demo test bench accel-check clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-beam.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip==26.3 setuptools==80.9.0
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt -r requirements-beam.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash scripts/demo.sh $(DEMO_OUT)

# three pytest-xdist workers (more than the 2 cores: tracing is single-threaded), each on one
# TensorFlow thread; a test's group runs whole on one worker (tests/conftest.py GROUPS)
test: $(STAMP)
	$(PY) -m pytest tests -n 3 --dist loadgroup --durations=30

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# proves and measures the GPU/CPU training and predict paths; e.g. ACCEL_ARGS=--smallest
accel-check: $(STAMP)
	$(PY) scripts/accel_check.py $(ACCEL_ARGS)

clean:
	rm -rf $(VENV) demo_out bench_out
