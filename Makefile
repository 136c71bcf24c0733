# ambient-ray: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# timm needs torchvision, and torchvision pins its torch: install the matching pair first.
# Override with e.g. TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" (aarch64) or a CPU-only index.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" setuptools wheel
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e ".[dev]"
	# DeepSpeed's CPU Adam (ZeRO-Offload) is a C++ op compiled on first use (~70 s on 2 cores): build it once
	# here, into this venv (tests/conftest.py points TORCH_EXTENSIONS_DIR there too), not inside a test
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions DS_ACCELERATOR=cpu $(PY) -c \
		"from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
	touch $(STAMP)

demo: setup
	$(PY) -m jobs.demo

test: setup lint docs browser
	$(PY) -m pytest tests

# the documentation site (docs/, mkdocs.yml), built offline; --strict turns a broken link or a missing page into a failure
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

# Debian's Chromium, for the test that opens the MLflow UI in a real (headless) browser
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
		|| { echo "make browser: could not install Debian's chromium (needs root and apt-get)" >&2; exit 2; }

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/corrupt_throughput.py
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/annotate_throughput.py
	$(PY) benchmarks/precompute_throughput.py
	$(PY) benchmarks/tune_overhead.py
	$(PY) benchmarks/train_memory.py
	$(PY) benchmarks/feed.py
	$(PY) benchmarks/model_throughput.py
	$(PY) benchmarks/threads_under_load.py
	$(PY) benchmarks/scale.py --resolution 64

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache mlruns mlflow.db
