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
	$(BIN)/python -m experiments.demo $(DEMO_ARGS)

demo-quick: $(BIN)/.run-deps
	$(BIN)/python -m experiments.demo --quick $(DEMO_ARGS)

test: $(BIN)/.dev-deps
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.dev-deps
	$(BIN)/python -m experiments.bench

# The results (README's headline rows, docs/results.md's whole table): the demo over 3 seeds (each its own
# world and base model), mean and spread, with the random / complement controls for every method (make demo
# has them for `full` only).
results: $(BIN)/.run-deps
	$(BIN)/python -m experiments.demo --seeds 0 1 2 --controls all --results assets/results.md

clean:
	rm -rf out

# The README's figures from the demo's seed 0 (matplotlib is an optional extra, installed only here):
# Figure 1 (loss, probe perplexity, per-unit gradient norms over training) and Figure 2 (the traces).
FIG_RUNS = full+none full+fp full+fp:complement
figure: $(BIN)/.run-deps
	$(BIN)/python -m pip install --quiet -r requirements-extra.txt
	$(BIN)/python -m experiments.demo --only $(FIG_RUNS) --plot
	$(BIN)/python -m experiments.plot $(addprefix out/demo/seed0/runs/,$(FIG_RUNS)) --png assets/figure1.png --out assets/figure1.txt
	cp out/demo/seed0/trace.png assets/trace.png
	cp out/demo/seed0/trace_facts.png assets/trace_facts.png
