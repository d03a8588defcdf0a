# The README's two commands. Both set up everything on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: demo test test-fast install dev clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,eval]"
	touch $@

install: $(VENV)/.installed

DEMO ?= demo
# One thread per physical core, as accelerate would pick itself; passing it keeps its three-line notice away.
CPU_THREADS ?= $(shell $(PY) -c "import psutil; print(psutil.cpu_count(logical=False) or 1)" 2>/dev/null || echo 1)
DEMO_TRAIN ?= --preset mini --block_size 256 --micro_batch_size 8 --max_steps 300 --warmup_steps 30 \
	--lr 2e-3 --min_lr 2e-4 --eval_interval 50 --eval_iters 10 --save_interval 100 --log_interval 5

# The whole pipeline, offline, on CPU: corpus -> ids -> training -> HF export -> sample -> plot.
demo: $(VENV)/.installed
	$(PY) -m tokenization.sample_corpus $(DEMO)/corpus.jsonl
	$(PY) -m tokenization.prepare $(DEMO)/corpus.jsonl --out $(DEMO)/data --overwrite
	$(VENV)/bin/accelerate launch -q --num_cpu_threads_per_process $(CPU_THREADS) \
		--config_file accelerate_configs/cpu.yaml -m accel_pretrain.train \
		--data $(DEMO)/data --out $(DEMO)/run --overwrite --mixed_precision auto $(DEMO_TRAIN)
	$(PY) -m accel_pretrain.export $(DEMO)/run $(DEMO)/hf --overwrite
	$(PY) -m accel_pretrain.generate $(DEMO)/hf --prompt "Return the number of" --max_new_tokens 48
	$(PY) -m accel_pretrain.plot $(DEMO)/run --out $(DEMO)/loss.png
	$(PY) -m accel_pretrain.evaluate $(DEMO)/run --data $(DEMO)/data > $(DEMO)/eval.json
	@$(PY) -c "import json; e = json.load(open('$(DEMO)/eval.json')); \
	print(f\"\nvalidation loss {e['loss']:.3f} nats ({e['bits_per_byte']:.3f} bits/byte) vs unigram model \
	{e['unigram_loss']:.3f} nats\"); assert e['loss'] < e['unigram_loss'] - 1.0, 'did not beat the unigram model'"
	@echo "outputs: data $(DEMO)/data | run $(DEMO)/run (train_log.jsonl, checkpoints/) | \
	Hugging Face model $(DEMO)/hf | plot $(DEMO)/loss.png"

# Two workers, one test file each at a time (a file's tests share what they build: inductor's and
# lm-eval's caches, compiled block masks); each worker runs torch on one thread (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The edit-test loop: every test that runs in this process (those that start others: make test).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not launches"

clean:
	rm -rf demo .pytest_cache
