# The two commands: `make demo` (set up, then run the demo) and `make test` (set up, then run every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to releases that install from this project's known-good wheels (see constraints.txt)
PIP_INSTALL := $(BIN)/pip install -c constraints.txt

.PHONY: setup demo test docs lint bench clean

$(BIN)/mlfarm: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

setup: $(BIN)/mlfarm

demo: setup
	$(BIN)/mlfarm demo

# The docs build is strict, so a broken link or a reference page the code can no longer generate fails the tests
# (no --quiet: it silences the warnings that strict mode counts).
test: setup
	$(BIN)/ruff check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .site
	sh compose/ensure-docker-compose.sh
	$(BIN)/python -m pytest

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: setup
	$(BIN)/python benchmarks/bench_farm.py

clean:
	rm -rf $(VENV) *.egg-info .site
