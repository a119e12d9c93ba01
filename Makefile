# Two commands: `make demo` (set up, then run the whole method on the synthetic world)
# and `make test` (set up, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo demo-quick test bench results figure clean

$(BIN)/.run-deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(BIN)/.dev-deps: $(BIN)/.run-deps requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(BIN)/.run-deps
	$(BIN)/python demo.py $(DEMO_ARGS)

demo-quick: $(BIN)/.run-deps
	$(BIN)/python demo.py --quick $(DEMO_ARGS)

test: $(BIN)/.dev-deps
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.dev-deps
	$(BIN)/python bench.py

# The README's results table: the demo over 3 seeds, mean and spread.
results: $(BIN)/.run-deps
	$(BIN)/python demo.py --seeds 0 1 2 --results assets/results.md

clean:
	rm -rf out

# The README's trace figure (matplotlib is an optional extra, installed only here).
figure: $(BIN)/.run-deps
	$(BIN)/python -m pip install --quiet -r requirements-extra.txt
	$(BIN)/python demo.py --only full+none --plot
	cp out/demo/seed0/trace.png assets/trace.png
