# Two entry points for a fresh machine: `make quickstart` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,label,eval
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test clean

$(BIN)/.installed-$(EXTRAS): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed-$(EXTRAS)

# ShapesWorld (README): erase "red" from the shipped toy model with SDD (+ the preservation term), then measure it
# against the base model
quickstart: install
	rm -rf outputs/quickstart  # a scratch run: start it afresh each time
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	  train/train_sdd.py --config configs/sdd/shapes_red_fast.yaml output_dir=outputs/quickstart/sdd-red
	$(BIN)/sdd-shapes bench --model base=shapes --model sdd=outputs/quickstart/sdd-red/pipeline --concept red \
	  --out outputs/quickstart/bench

test: install
	WANDB_MODE=offline $(BIN)/python -m pytest tests

clean:
	rm -rf outputs .pytest_cache
