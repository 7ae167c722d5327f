# make quickstart | make test | make test-fast | make tiny-checkpoints
# `make quickstart` and `make test` do all the set-up on a fresh machine (README.md).
PYTHON ?= python3
# The CPU wheel on machines without CUDA; GPU machines keep the torch they have.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install quickstart test test-fast tiny-checkpoints

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

# Pretrain a tiny Qwen3 on this machine: no SLURM, no GPU, 2 processes over gloo.
quickstart: install
	bash launchers/pretrain.sh --config conf.d/tiny-qwen3.conf

tiny-checkpoints: install
	$(PYTHON) -m train.models.random_hf tiny-qwen3 runs/models/tiny-qwen3

# Everything, the real local SLURM cluster included (needs root: it installs slurm + munge).
test: install
	REQUIRE_SLURM=$${REQUIRE_SLURM:-$${CI:+1}} $(PYTHON) -m pytest -q -rs --durations=20 $(PYTEST_ARGS)

test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)
