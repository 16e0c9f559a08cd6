# The README's first two commands. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo vit-demo test bench clean-runs

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# The test suite also runs the integrations' frameworks (accelerate for the Hugging Face Trainer, pytorch-lightning).
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(VENV)/bin/pip install --quiet -r requirements-test.txt -c requirements.txt  # never moves a pin of requirements.txt
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

# The paper's second system on CPU: the 0.2M-parameter ViT on the shipped digits with AlphaDecay, about 2 minutes.
# Light augmentation (no RandAugment, Mixup/CutMix or random erasing): with the full ImageNet recipe a few CPU
# minutes stay at chance on 1,442 images (README, "ViT on ImageNet").
vit-demo: $(VENV)/.installed
	rm -rf runs/vit-demo  # a fresh run each time (a run directory with checkpoints is otherwise refused)
	$(PY) vit_main.py --model vit_tiny_patch4_32 --input_size 32 --data_path data/digits_sample --device cpu \
		--aa none --mixup 0 --cutmix 0 --reprob 0 --lr 2e-3 --batch_size 32 --epochs 40 --warmup_epochs 2 \
		--wd_scheduler alphadecay --weight_decay 5e-6 --model_ema true --model_ema_decay 0.99 --model_ema_eval true \
		--num_workers 0 --save_ckpt_num 1 --log_every 10 --wandb_name vit-demo --output_dir runs/vit-demo \
		--wandb_mode offline

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf runs
