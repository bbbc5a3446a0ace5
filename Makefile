# The two commands: `make demo` (set up, then run the demo) and `make test` (set up, then run every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to releases that install from this project's known-good wheels (see constraints.txt)
PIP_INSTALL := $(BIN)/pip install -c constraints.txt

.PHONY: setup demo test docs lint bench clean import-tree

$(BIN)/mlfarm: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

setup: $(BIN)/mlfarm

demo: setup
	$(BIN)/mlfarm demo

# lint-imports walks one package folder, but the repository keeps the user's layout (broker/, worker/,
# ... map to mlfarm.* through package-dir): lay the installed tree out as links, read from pyproject,
# and check from inside it, so `mlfarm` is found there and not through the editable install.
IMPORT_TREE := $(VENV)/import-tree
import-tree:
	rm -rf $(IMPORT_TREE) && mkdir -p $(IMPORT_TREE)/mlfarm
	for f in mlfarm/*; do ln -s "$(CURDIR)/$$f" $(IMPORT_TREE)/mlfarm/; done
	grep -o '"mlfarm\.[a-z_]*" = "[a-z_]*"' pyproject.toml | tr -d '"' | \
		while read name _ folder; do ln -s "$(CURDIR)/$$folder" "$(IMPORT_TREE)/$$(echo $$name | tr . /)"; done

# The docs build is strict, so a broken link or a reference page the code can no longer generate fails the tests
# (no --quiet: it silences the warnings that strict mode counts).
test: setup import-tree
	$(BIN)/ruff check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .site
	cd $(IMPORT_TREE) && PYTHONPATH=. $(abspath $(BIN))/lint-imports $(CURDIR)/pyproject.toml
	sh compose/ensure-docker-compose.sh
	$(BIN)/python -m pytest

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: setup
	$(BIN)/python benchmarks/bench_farm.py
	$(BIN)/python benchmarks/bench_cache.py

clean:
	rm -rf $(VENV) *.egg-info .site
