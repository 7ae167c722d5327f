"""python -m pytest tests/integration/test_finetune.py  (LoRA fine-tuning jobs on tiny-qwen3: early stopping,
validate mode on 1 and 2 torchrun processes over gloo, bad input, LoRA on a fake-quantized base)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-finetune-Data-synthetic-lr0.0002"
EARLY_RUN = "tiny-qwen3-finetune-Data-synthetic-lr0.02"  # a high LR: the adapters move the logits (export test)
# 5 records, 2 categories; "category" left out once (it defaults to the label)
LABELED = [("Is a lemon a fruit or a colour?", "fruit", "food"), ("Is blue a fruit or a colour?", "colour", "paint"),
           ("Is an apple a fruit or a colour?", "fruit", "food"), ("Is red a fruit or a colour?", "colour", "paint"),
           ("Is a plum a fruit or a colour?", "fruit", None)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A seeded random tiny-qwen3 HF directory with a local BPE tokenizer and chat template in it."""
    from tests.fixtures.synthetic_data import build_tokenizer, generate_documents
    from train.models import build_model, init_weights, save_hf

    directory = tmp_path_factory.mktemp("base") / "tiny-qwen3"
    save_hf(init_weights(build_model("tiny-qwen3", device="cpu"), 1234), directory)
    build_tokenizer(str(directory), generate_documents(100, 40) + [p for p, _, _ in LABELED], 400)
    return directory


@pytest.fixture(scope="module")
def labeled_set(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sets") / "labeled.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "label": l, **({"category": c} if c else {})}) + "\n"
                            for p, l, c in LABELED))
    return path


def finetune(root: Path, base: Path, *overrides: str, procs: int = 2, env_extra: dict | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_",
                                                                     "TRAIN_STOP_FILE", "RUN_DATETIME"))}
    env.update(env_extra or {})
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"] if procs > 1
                else [sys.executable])
    command = [*launcher, "-m", "train.finetune", f"checkpoint.root={root}", "logging.tensorboard=false",
               "model.name=tiny-qwen3", f"model.hf_checkpoint={base}", "data=synthetic", "data.seq_length=32",
               "lora.rank=4", "lora.alpha=8", *overrides]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory, base):
    """20 iterations asked; min_delta 100: only the first evaluation improves, patience 2 stops at 6."""
    root = tmp_path_factory.mktemp("runs")
    stop_file = root / "stop.json"
    result = finetune(root, base, "optim.lr=0.02", "optim.warmup_iters=0",
                      "training.train_iters=20", "training.eval_interval=2", "training.eval_iters=2",
                      "training.early_stop_patience=2", "training.early_stop_min_delta=100",
                      "checkpoint.save_interval=100", "checkpoint.keep_last=1",
                      env_extra={"TRAIN_STOP_FILE": str(stop_file), "RUN_DATETIME": "20260101_000001"})
    return root, result, stop_file


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint_and_does_not_requeue(early_stopped, base):
    root, result, stop_file = early_stopped
    assert result.returncode == 0, output(result)
    assert "stopped at iteration 6: early_stop" in result.stdout
    checkpoints = root / EARLY_RUN / "checkpoints" / "tiny-qwen3"
    # keep_last=1 would leave only 6; the best (2) is protected from rotation
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000002", "iter_0000006"]
    assert json.loads(stop_file.read_text()) == {"reason": "early_stop", "iteration": 6, "requeue": False,
                                                 "signal": None}
    records = [json.loads(line) for line in next((root / EARLY_RUN / "logs").glob("*.jsonl")).read_text().splitlines()]
    assert [r["iteration"] for r in records if "val_loss" in r] == [2, 4, 6]
    # a job started again on the same run resumes, sees it already stopped, and does nothing
    # on one process, GBS set to the saved 4 (2 processes x MBS 2): a resume keeps its GBS (docs/runs.md)
    again = finetune(root, base, "optim.lr=0.02", "training.train_iters=20", "training.eval_interval=2",
                     "training.early_stop_patience=2", "training.early_stop_min_delta=100",
                     "training.global_batch_size=4", procs=1)
    assert again.returncode == 0, output(again)
    assert "this run already stopped" in again.stdout and "stopped at iteration" not in again.stdout
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000002", "iter_0000006"]


@pytest.mark.slow
def test_validate_on_two_ranks_equals_one(early_stopped, base, labeled_set):
    root, trained, _ = early_stopped
    assert trained.returncode == 0, output(trained)
    common = ("mode=validate", f"validate.val_set={labeled_set}", "validate.max_new_tokens=6",
              "validate.batch_size=2")
    # the same valid samples: 2 ranks x 2 micro-batches, 1 rank x 4 (train/validation.py eval_batches)
    two = finetune(root, base, *common, "optim.lr=0.02", "training.eval_iters=2",
                   env_extra={"RUN_DATETIME": "20260101_000002"})
    one = finetune(root, base, *common, "optim.lr=0.02", "training.eval_iters=4", procs=1,
                   env_extra={"RUN_DATETIME": "20260101_000003"})
    assert two.returncode == 0 and one.returncode == 0, output(two) + output(one)
    logs = root / EARLY_RUN / "logs"
    summaries, predictions = [], []
    for stamp in ("20260101_000002", "20260101_000003"):
        summaries.append(json.loads((logs / f"tiny-qwen3_validate_{stamp}.summary.json").read_text()))
        predictions.append([json.loads(line) for line in
                            (logs / f"tiny-qwen3_validate_{stamp}.predictions.jsonl").read_text().splitlines()])
    assert predictions[0] == predictions[1]
    rows = predictions[0]
    assert [r["index"] for r in rows] == list(range(len(LABELED)))
    assert [(r["prompt"], r["label"], r["category"]) for r in rows] == [(p, l, c or l) for p, l, c in LABELED]
    assert all(set(r) == {"index", "prompt", "category", "label", "generated", "predicted", "correct"} for r in rows)
    two_summary, one_summary = summaries
    assert two_summary["world_size"] == 2 and one_summary["world_size"] == 1
    assert two_summary["iteration"] == 6 and two_summary["checkpoint"].endswith("iter_0000006")
    assert two_summary["val_loss"] == pytest.approx(one_summary["val_loss"], rel=1e-5)
    assert 0 < two_summary["val_loss"] < 20
    for key in ("total", "correct", "accuracy", "per_category"):
        assert two_summary[key] == one_summary[key], key
    assert two_summary["total"] == 5 and set(two_summary["per_category"]) == {"food", "paint", "fruit"}
    assert two_summary["correct"] == sum(r["correct"] for r in rows)
    assert "validate: iteration 6" in two.stdout


@pytest.mark.slow
def test_bad_input_fails_before_any_model_is_built(tmp_path, base, labeled_set):
    root = tmp_path / "runs"
    broken = tmp_path / "broken.jsonl"
    broken.write_text(labeled_set.read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "no label"}) + "\n")
    bad_set = finetune(root, base, "mode=validate", f"validate.val_set={broken}", procs=1)
    assert bad_set.returncode == 2 and f"{broken}:2: key 'label' missing" in bad_set.stderr
    no_run = finetune(root, base, "mode=validate", f"validate.val_set={labeled_set}", procs=1)
    assert no_run.returncode == 2 and "mode=validate: no checkpoint in" in no_run.stderr
    assert not list(root.glob(f"{RUN}/logs/*validate*"))


@pytest.mark.slow
def test_lora_on_a_quantized_base_trains_and_validates(tmp_path, base, labeled_set):
    """nvfp4 (CPU backend) base: the checkpoint holds the calibrated amax and the quantizer state;
    validate restores both (no calibration)."""
    root = tmp_path / "runs"
    common = ("lora.quantized_base=nvfp4", "quant.calibration_batches=1")
    trained = finetune(root, base, *common, "training.train_iters=2", procs=1)
    assert trained.returncode == 0, output(trained)
    assert "quantized with recipe nvfp4" in trained.stdout
    validated = finetune(root, base, *common, "mode=validate", f"validate.val_set={labeled_set}",
                         "validate.max_new_tokens=2", procs=1)
    assert validated.returncode == 0, output(validated)
    assert "quantizer state (nvfp4) restored" in validated.stdout  # not calibrated again
    summary = json.loads(next((root / RUN / "logs").glob("*.summary.json")).read_text())
    assert summary["iteration"] == 2 and summary["total"] == 5 and 0 < summary["val_loss"] < 20
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(root / RUN / "checkpoints/tiny-qwen3/iter_0000002")).read_metadata()
    keys = list(metadata.state_dict_metadata)
    assert any(k.endswith("q_proj.base_layer.weight_quantizer._amax") for k in keys)
    assert not any("lora_" in k and "quantizer" in k for k in keys)
    assert (root / RUN / "checkpoints/tiny-qwen3/iter_0000002/quantizer_state.pt").is_file()


def export_run(root: Path, export_format: str, out: Path) -> None:
    exported = subprocess.run([sys.executable, "-m", "train.export", str(root / EARLY_RUN), "--format", export_format,
                               "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, output(exported)


def base_and_adapted_logits(root: Path, base: Path, tokens):
    """(logits of the base, of base + LoRA from the early-stopped run's iteration 6), ours, fp32."""
    from types import SimpleNamespace

    import torch
    import torch.distributed.checkpoint as dcp

    from train.lora import apply_lora
    from train.models import load_hf

    model = load_hf(base).eval()
    with torch.no_grad():
        base_logits = model(tokens)
    from train.config import LoraConfig

    model = apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.05, target_modules="q_proj,k_proj,v_proj,o_proj"))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(root / EARLY_RUN / "checkpoints/tiny-qwen3/iter_0000006"))
    model.load_state_dict(state["model"])
    with torch.no_grad():
        return base_logits, model.eval()(tokens)


@pytest.mark.slow
def test_finetune_run_exports_to_hf_with_the_adapted_logits(early_stopped, base, tmp_path):
    """python -m train.export RUN_DIR --format hf: the adapters merged into bf16 weights that
    transformers loads; its logits are those of base + LoRA loaded from the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    root, trained, _ = early_stopped
    assert trained.returncode == 0, output(trained)
    export_run(root, "hf", tmp_path / "exported")
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    base_logits, adapted = base_and_adapted_logits(root, base, tokens)
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()(tokens).logits
    moved = (adapted - base_logits).abs().max().item()
    error = (hf_logits - adapted).abs().max().item()
    assert error < 0.1 * moved, (error, moved)  # bf16 rounding only; the adapters' effect is 10x larger


@pytest.mark.slow
def test_finetune_run_exports_peft_adapters_that_peft_loads_with_our_logits(early_stopped, base, tmp_path):
    """python -m train.export RUN_DIR --format peft: PeftModel.from_pretrained(base, DIR) computes
    the logits of our base + LoRA from the same checkpoint (fp32: tight); the tokenizer comes along."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, trained, _ = early_stopped
    assert trained.returncode == 0, output(trained)
    out = tmp_path / "adapters"
    export_run(root, "peft", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert AutoTokenizer.from_pretrained(out)("Is a lemon a fruit?").input_ids == \
        AutoTokenizer.from_pretrained(base)("Is a lemon a fruit?").input_ids
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    base_logits, adapted = base_and_adapted_logits(root, base, tokens)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)
        peft_logits = peft_model.eval()(tokens).logits
    moved = (adapted - base_logits).abs().max().item()
    assert moved > 1e-2 and (peft_logits - adapted).abs().max().item() < 1e-4 * max(moved, 1.0)


@pytest.mark.slow
def test_lora_on_two_pipeline_stages_equals_one_process(tmp_path, base):
    """PP_SIZE=2: the adapters on the whole base, then split; each rank starts them at rank 0's
    values (no DDP broadcast on stages), so losses, gradient norms and val_loss are one process's;
    also under interleaved 1F1B (2 virtual stages a rank, val_loss through the 4 stages in order)."""
    common = ["lora.dropout=0", "training.micro_batch_size=2", "training.global_batch_size=4",
              "training.train_iters=3", "training.eval_interval=3", "checkpoint.save_interval=3", "optim.lr=1e-2"]
    pp2 = ["parallel.pipeline_parallel_size=2"]
    interleaved = [*pp2, "parallel.pipeline_schedule=interleaved_1f1b", "parallel.virtual_stages=2"]
    runs = {}
    for name, procs, extra in (("one", 1, []), ("pp2", 2, pp2), ("interleaved", 2, interleaved)):
        result = finetune(tmp_path / name, base, *common, *extra, procs=procs)
        assert result.returncode == 0, output(result)
        path = next((tmp_path / name / RUN.replace("lr0.0002", "lr0.01") / "logs").glob("*.jsonl"))
        runs[name] = [json.loads(line) for line in path.read_text().splitlines()]
    for split in ("pp2", "interleaved"):
        assert [sorted(record) for record in runs[split]] == [sorted(record) for record in runs["one"]]
        for mine, theirs in zip(runs[split], runs["one"]):
            for key in ("loss", "grad_norm", "val_loss"):
                if key in theirs:
                    assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (split, key, mine, theirs)
