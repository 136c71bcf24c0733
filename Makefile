# ambient-ray: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A CPU build of torch keeps the venv small where no GPU is used; override with TORCH_SPEC=torch.
TORCH_SPEC ?= $(shell ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 && echo torch==2.13.0 || echo torch)
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" setuptools wheel
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) -m jobs.demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/corrupt_throughput.py

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
