# make quickstart | make test | make test-fast | make tiny-checkpoints | make gpu-wheels | make mutate
# `make quickstart` and `make test` do all the set-up on a fresh machine (README.md).
PYTHON ?= python3
# The CPU wheel on machines without CUDA; GPU machines keep the torch they have.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install malloc quickstart test test-fast tiny-checkpoints gpu-wheels mutate

install: malloc
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

# Optional: mimalloc, which preprocessing preloads when installed (train/data/malloc.py).
# Installed from apt when we are root; otherwise a note, and glibc's malloc is used.
MIMALLOC_APT = DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libmimalloc2.0 >/dev/null 2>&1
malloc:
	@ldconfig -p | grep -q libmimalloc || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { $(MIMALLOC_APT) || { apt-get update -q >/dev/null 2>&1 && $(MIMALLOC_APT); }; }; } || \
	  echo "note: libmimalloc2.0 not installed (needs root and apt); preprocessing uses glibc's malloc"

# A tiny Qwen3 learns real text on this machine (no SLURM, no GPU, 2 processes over gloo): corpus,
# tokenizer, preprocessing, about a minute of pretraining, plots. Each step is skipped when done.
quickstart: install
	PYTHON=$(PYTHON) bash launchers/quickstart.sh

gpu-wheels:
	bash benchmarks/gpu/wheels.sh

# Random tiny-qwen3 weights and a tokenizer with a chat template (LoRA validate mode needs one).
QUICKSTART_CORPUS = data/quickstart/stdlib.jsonl
tiny-checkpoints: install
	$(PYTHON) -m train.models.random_hf tiny-qwen3 runs/models/tiny-qwen3
	@[ -f $(QUICKSTART_CORPUS) ] || $(PYTHON) -m train.data corpus --output $(QUICKSTART_CORPUS)
	$(PYTHON) -m train.data tokenizer --input $(QUICKSTART_CORPUS) --vocab-size 1024 --output runs/models/tiny-qwen3

# Everything, the real local SLURM cluster included (needs root: it installs slurm + munge).
test: install
	REQUIRE_SLURM=$${REQUIRE_SLURM:-$${CI:+1}} $(PYTHON) -m pytest -q -rs --durations=20 $(PYTEST_ARGS)

test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

# Mutation check of the critical code (benchmarks/mutation/run.py, docs/testing.md): about a minute; not in `make test`.
mutate:
	$(PYTHON) benchmarks/mutation/run.py
