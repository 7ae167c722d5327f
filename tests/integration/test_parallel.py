"""python -m pytest tests/integration/test_parallel.py  (torchrun, 2 processes, gloo; ~2 min in all)

Two kinds of runs:
- the real entrypoint (`torchrun -m train.pretrain parallel.data_parallel=...`): losses read
  from the run's JSONL metrics equal a single-process run with the same global batch;
- tests/integration/parallel_worker.py: gradients, weights, DTensor placements and local
  shapes against a single-device reference inside the same processes; ZeRO-1 and its DCP
  checkpoints live there until the trainer builds its optimizer with train.parallel.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# debug-qwen3: 2 layers, 4 heads / 2 KV heads, tied embeddings. GBS 4 = 2 ranks x MBS 2, or one
# process accumulating 2 micro-batches. eps 1e-4: see parallel_worker.optim_cfg.
COMMON = ["model.name=debug-qwen3", "data.source=synthetic", "data.seq_length=32",
          "training.micro_batch_size=2", "training.global_batch_size=4", "optim.lr=1e-2",
          "optim.schedule=constant", "optim.warmup_iters=0", "optim.eps=1e-4", "logging.tensorboard=false"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "NUM_GPUS", "MASTER_", "TRAIN_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def pretrain(root: Path, overrides: list[str], processes: int = 2) -> list[float]:
    """Runs train.pretrain; returns the logged losses, one per iteration."""
    return run_pretrain(root, [*COMMON, *overrides], processes)


def run_pretrain(root: Path, arguments: list[str], processes: int, timeout: int = 120) -> list[float]:
    """train.pretrain with these config overrides on `processes` processes (torchrun above one);
    returns the logged losses, one per iteration."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "train.pretrain", f"checkpoint.root={root}", *arguments]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return losses(root)


def losses(root: Path) -> list[float]:
    """Loss per iteration from every JSONL metrics file under root (a resumed run adds a file)."""
    by_iteration = {}
    for path in sorted(root.glob("*/logs/*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "iteration" in record and "loss" in record:
                by_iteration[record["iteration"]] = record["loss"]
    return [by_iteration[i] for i in sorted(by_iteration)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> list[float]:
    """The reference: 4 iterations in one process."""
    return pretrain(tmp_path_factory.mktemp("single"), ["training.train_iters=4"], processes=1)


@pytest.mark.parametrize("overrides", [
    ["parallel.data_parallel=ddp"],
    ["parallel.data_parallel=fsdp"],
    ["parallel.data_parallel=fsdp_zero2"],
    ["parallel.tensor_parallel_size=2"],
    ["parallel.data_parallel=zero1"],
], ids=["ddp", "fsdp", "fsdp_zero2", "tp2", "zero1"])
def test_two_processes_match_one(tmp_path, single_process, overrides):
    parallel = pretrain(tmp_path, ["training.train_iters=3", *overrides])
    assert len(parallel) == 3
    assert parallel == pytest.approx(single_process[:3], rel=1e-4)


@pytest.mark.slow
def test_four_processes_tp2_times_fsdp2_match_one(tmp_path, single_process):
    """The 2-D mesh: TP inside pairs of ranks, FSDP2 across them (DTensors sharded on both)."""
    parallel = pretrain(tmp_path, ["training.train_iters=3", "parallel.tensor_parallel_size=2",
                                   "parallel.data_parallel=fsdp"], processes=4)
    assert parallel == pytest.approx(single_process[:3], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("saved_with, resumed_with", [
    ("parallel.data_parallel=fsdp", "parallel.data_parallel=ddp"),
    ("parallel.tensor_parallel_size=2", "parallel.data_parallel=fsdp"),
    ("parallel.data_parallel=zero1", "parallel.data_parallel=zero1"),
], ids=["fsdp-to-ddp", "tp2-to-fsdp", "zero1-to-zero1"])
def test_checkpoint_resumes_under_another_layout(tmp_path, single_process, saved_with, resumed_with):
    """DCP reshards: Shard(0)/TP DTensors load into another layout, optimizer moments too."""
    first = pretrain(tmp_path, ["training.train_iters=2", saved_with])
    assert first == pytest.approx(single_process[:2], rel=1e-4)
    resumed = pretrain(tmp_path, ["training.train_iters=4", resumed_with])
    assert resumed == pytest.approx(single_process, rel=1e-4)


def run_worker(directory: Path, cases: list[str], worker: str = "parallel_worker.py", processes: int = 2,
               timeout: int = 300) -> dict[str, str]:
    """One torchrun of a tests/integration/*_worker.py over `cases` (start-up paid once):
    {case: "ok" | traceback} (worker_cases.run_cases)."""
    results = directory / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(REPO / "tests" / "integration" / worker), str(results), ",".join(cases)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and results.exists(), (result.stdout + result.stderr)[-4000:]
    return json.loads(results.read_text())


LAYOUT_CASES = ["fsdp_layout", "tp_layout", "tp_qwen3_next_layout", "fsdp_mixed_precision"]
TRAINING_CASES = ["ddp", "zero1", "zero1_checkpoint", "fsdp_activation_checkpointing", "tp_qwen3", "tp_gpt2", "tp_llama2",
                  "tp_qwen3_next", "tp_qwen3_next_activation_checkpointing", "tp_qwen3_next_checkpoint"]


# the worker's cases run in one torchrun with the other files' (conftest.py shared_launch)
SHARED_LAUNCHES = {"test_dtensor_layout": ("parallel_worker", 2, LAYOUT_CASES),
                   "test_gradients_and_weights_match_one_device": ("parallel_worker", 2, TRAINING_CASES)}


@pytest.fixture(scope="module")
def layouts(shared_launch):
    return shared_launch("parallel_worker", 2)


@pytest.fixture(scope="module")
def training(shared_launch):
    return shared_launch("parallel_worker", 2)


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_dtensor_layout(layouts, case):
    """FSDP: every parameter Shard(0) on dim 0; TP: colwise/rowwise shards of the expected local shapes;
    FSDP2's MixedPrecisionPolicy: bf16 compute over fp32 shards and gradients."""
    assert layouts[case] == "ok", layouts[case]


@pytest.mark.slow
@pytest.mark.parametrize("case", TRAINING_CASES)
def test_gradients_and_weights_match_one_device(training, case):
    """3 AdamW steps: loss, every gradient and every weight equal the single-device reference."""
    assert training[case] == "ok", training[case]


UNTIED = ["model.name=debug-llama3", "training.train_iters=3"]


@pytest.fixture(scope="module")
def untied_single_process(tmp_path_factory) -> list[float]:
    """The reference of the untied model: 3 iterations in one process."""
    return pretrain(tmp_path_factory.mktemp("untied"), UNTIED, processes=1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_untied_lm_head_two_processes_match_one(tmp_path, untied_single_process, strategy):
    """The default loss reads lm_head.weight after the forward (train/losses.py); untied, that
    weight is used nowhere else, so its gradient must reach DDP's all-reduce / FSDP2's
    reduce-scatter from outside the module's forward."""
    single = untied_single_process
    parallel = pretrain(tmp_path / "two", [*UNTIED, f"parallel.data_parallel={strategy}"])
    assert len(parallel) == 3
    assert parallel == pytest.approx(single, rel=1e-4)
