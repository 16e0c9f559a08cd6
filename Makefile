# The README's first two commands. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean-runs

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# The main job on the shipped default: a 2.9M-parameter LLaMA on the shipped C4-layout sample, CPU, a few minutes.
# --official_eval_rows 16: the official estimator as the official code would compute it for this run's global batch
# of 16 (the default 512 is the paper's scripts'; over the sample's 281 validation rows it would be one batch, halved).
demo: $(VENV)/.installed
	rm -rf runs/demo  # a fresh run each time (a run directory with checkpoints is otherwise refused)
	$(PY) torchrun_main.py --model_config configs/llama_3m.json --dataset data/c4_sample --tokenizer data/tokenizer \
		--device cpu --dtype float32 --optimizer adamw --lr 3e-3 --weight_decay 0.1 --batch_size 16 --total_batch_size 16 \
		--max_length 256 --num_training_steps 300 --warmup_steps 30 --eval_every 100 --log_every 10 --save_every 300 \
		--target_eval_tokens 100000 --official_eval_rows 16 --wandb_name demo --save_dir runs/demo --wandb_mode offline

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf runs
