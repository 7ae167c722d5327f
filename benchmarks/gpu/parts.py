"""The parts of the GPU acceptance run, one per process: `python benchmarks/gpu/parts.py PART --size full|smoke --json F`.

benchmarks/gpu/run.py starts each with its time budget and collects the JSON each writes:
{"rows": [{...}, ...], "notes": [...]}. A part that cannot run here raises Skip; any other
exception is the part's failure (run.py records the last line). Sizes: `full` is the real
measurement on one GPU (Qwen3-1.7B at sequence 4096, bf16); `smoke` the same code on tiny sizes
on the CPU, so that the script is known to work before device time is spent on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from anywhere without installing
GB = 1024**3


class Skip(Exception):
    """The part cannot run on this machine (no CUDA for a full run); not a failure."""


@dataclass(frozen=True)
class Size:
    model: str  # train_step and max_micro_batch: a registry name
    seq: int
    mbs: int
    steps: int  # timed steps (after warmup)
    warmup: int
    mbs_tries: tuple[int, ...]  # max_micro_batch: MBS tried in order until one does not fit
    qad_model: str  # qad_step: student and teacher (random weights, saved as an HF bf16 checkpoint)
    qad_seq: int
    loss_tokens: int  # loss_memory: positions, vocabulary, hidden size
    loss_vocab: int
    loss_hidden: int
    save_model: str  # async_save


SIZES = {
    "full": Size("qwen3-1.7b", 4096, 2, 5, 2, (1, 2, 4, 8, 16, 32), "qwen3-0.6b", 256, 4096, 151936, 2048, "qwen3-0.6b"),
    "smoke": Size("tiny-qwen3", 64, 2, 2, 1, (1, 2, 4), "tiny-qwen3", 64, 256, 2048, 128, "tiny-qwen3"),
}
# train_step variants: activation checkpointing, torch.compile per block, FSDP2 on one rank with
# bf16 autocast (fp32 parameters) or with its MixedPrecisionPolicy (bf16 compute and all-gather,
# fp32 gradient reduce; no autocast)
VARIANTS = {
    "eager": {},
    "checkpointing": {"checkpointing": True},
    "compile": {"compile": True},
    "compile_checkpointing": {"compile": True, "checkpointing": True},
    "fsdp_autocast": {"fsdp": True},
    "fsdp_mixed_precision": {"fsdp": True, "mixed_precision": True},
}


# ---------------------------------------------------------------------------------- helpers
def pick_device(size_name: str) -> str:
    import torch

    if size_name == "smoke":
        return "cpu"
    if not torch.cuda.is_available():
        raise Skip("no CUDA device (use --cpu-smoke on a CPU machine)")
    return "cuda"


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    """CUDA's peak of allocated tensor bytes since reset_peak; None on a CPU (no allocator statistics)."""
    import torch

    return torch.cuda.max_memory_allocated() / GB if device == "cuda" else None


def allocated_gb(device: str) -> float:
    import torch

    return torch.cuda.memory_allocated() / GB if device == "cuda" else 0.0


def release(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def single_process_group(device: str):
    """A one-rank process group and ("dp",) mesh, so that FSDP2 and DCP run as in a job."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    return init_device_mesh(device, (1,), mesh_dim_names=("dp",))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def build_trainable(name: str, device: str, *, checkpointing=False, compile=False, fsdp=False,
                    mixed_precision=False):
    """A registry model with fp32 master weights, parallelized as the engine does, and its AdamW."""
    from train.config import OptimConfig
    from train.models import build_model
    from train.optim import build_optimizer
    from train.parallel.apply import apply_activation_checkpointing, apply_compile
    from train.parallel.data_parallel import apply_fsdp

    model = build_model(name, device=device, seed=0).train()
    if checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if fsdp:
        model = apply_fsdp(model, single_process_group(device), reshard_after_forward=True,
                           mixed_precision=mixed_precision)
    return model, build_optimizer(model, OptimConfig())


def timed_steps(model, optimizer, device: str, mbs: int, seq: int, steps: int, warmup: int,
                autocast: bool = True) -> dict:
    """forward + fused LM loss + backward + AdamW, `warmup` untimed steps first; median seconds."""
    import torch

    from train.losses import language_model_loss

    ids = torch.randint(0, model.args.vocab_size, (mbs, seq + 1), device=device)  # (B, T+1)
    mask = torch.ones(mbs, seq, device=device)

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = language_model_loss(model, ids[:, :-1], ids[:, 1:], mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    reset_peak(device)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = step()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    step_s = median(seconds)
    return {"loss": loss, "step_s": step_s, "tokens_per_s": mbs * seq / step_s, "peak_gb": peak_gb(device)}


def planned_gb(model_name: str, *, mbs: int, seq: int, strategy: str, checkpointing: bool,
               fsdp_mixed_precision: bool = False) -> dict:
    """The memory plan's estimate for this step on one GPU (train/launch/memory.py): the whole
    peak, and the peak without the plan's fixed overhead (CUDA context, allocator slack), which
    torch.cuda.max_memory_allocated does not count."""
    from train.launch.memory import Split, memory_breakdown
    from train.models.registry import get_model_args

    plan = memory_breakdown(get_model_args(model_name), job="pretrain", layout=Split(1, 1, 1, strategy), mbs=mbs,
                            seq_length=seq, param_bytes=4, act_bytes=2, checkpointing=checkpointing,
                            fsdp_mixed_precision=fsdp_mixed_precision)
    return {"plan_gb": plan["total"] / GB, "plan_tensors_gb": (plan["total"] - plan["overhead"]) / GB}


# ---------------------------------------------------------------------------------- parts
def environment(size_name: str) -> dict:
    import importlib.metadata as metadata

    import torch

    row = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        row["memory_gb"] = torch.cuda.get_device_properties(0).total_memory / GB
        row["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for package in ("transformers", "nvidia-modelopt", "hydra-core", "peft", "triton", "flash-attn",
                    "flash-linear-attention"):
        try:
            row[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            row[package] = None
    return {"rows": [row]}


def gpu_tests(size_name: str, out_dir: Path) -> dict:
    """The `gpu`-marked tests (tests/gpu): pass/fail/skip counts and each failure's first line."""
    import xml.etree.ElementTree as ET

    report = out_dir / "gpu_tests.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
                           "-rs", f"--junitxml={report}"], cwd=REPO, capture_output=True, text=True)
    print(done.stdout[-6000:], done.stderr[-2000:])
    rows = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or child.text or "").strip().splitlines()[0][:200]
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                     "seconds": float(case.get("time", 0)), "message": message})
    if done.returncode not in (0, 5) or any(row["outcome"] == "failed" for row in rows):
        failed = [row["test"] for row in rows if row["outcome"] == "failed"]
        raise AssertionError(f"pytest exit {done.returncode}; failed: {', '.join(failed) or 'see the log'}")
    skips = Counter(row["message"] for row in rows if row["outcome"] == "skipped")
    notes = [f"{sum(row['outcome'] == 'passed' for row in rows)} passed"]
    notes += [f"{count} skipped ({reason})" for reason, count in skips.items()]
    return {"rows": rows, "notes": notes}


def train_step(size_name: str, variant: str) -> dict:
    """Tokens/s, MFU and peak memory of one training step, and the memory plan's estimate beside it."""
    from train import mfu as mfu_lib

    size, device = SIZES[size_name], pick_device(size_name)
    options = VARIANTS[variant]
    model, optimizer = build_trainable(size.model, device, **options)
    result = timed_steps(model, optimizer, device, size.mbs, size.seq, size.steps, size.warmup,
                         autocast=not options.get("mixed_precision"))
    flops = mfu_lib.model_flops_per_token(model, size.seq)
    mfu = mfu_lib.mfu(flops, result["tokens_per_s"], mfu_lib.device_peak_flops(f"{device}:0" if device == "cuda" else device))
    plan = planned_gb(size.model, mbs=size.mbs, seq=size.seq, strategy="fsdp" if options.get("fsdp") else "ddp",
                      checkpointing=bool(options.get("checkpointing")),
                      fsdp_mixed_precision=bool(options.get("mixed_precision")))
    measured = result["peak_gb"]
    row = {"variant": variant, "model": size.model, "seq": size.seq, "mbs": size.mbs, **result, "mfu": mfu, **plan,
           "measured_over_plan": measured / plan["plan_tensors_gb"] if measured is not None else None}
    return {"rows": [row]}


def max_micro_batch(size_name: str) -> dict:
    """The largest MBS whose step fits (bf16 autocast, fp32 master weights), with and without
    activation checkpointing: MBS doubles until CUDA runs out of memory."""
    import torch

    size, device = SIZES[size_name], pick_device(size_name)
    rows = []
    for checkpointing in (True, False):
        model, optimizer = build_trainable(size.model, device, checkpointing=checkpointing)
        best = None
        for mbs in size.mbs_tries:
            try:
                best = {"checkpointing": checkpointing, "mbs": mbs,
                        **timed_steps(model, optimizer, device, mbs, size.seq, steps=1, warmup=1)}
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                break
            finally:
                release(device)
        rows.append(best or {"checkpointing": checkpointing, "mbs": 0})
        del model, optimizer
        release(device)
    return {"rows": rows}


def bf16_checkpoint(name: str, directory: Path) -> None:
    """A random registry model saved by train.models.random_hf, then stored in bf16 as real HF checkpoints are."""
    import torch
    from safetensors.torch import load_file, save_file

    subprocess.run([sys.executable, "-m", "train.models.random_hf", name, str(directory)], check=True, cwd=REPO)
    for path in directory.glob("*.safetensors"):
        tensors = {key: value.to(torch.bfloat16) for key, value in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(torch_dtype="bfloat16", dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def run_records(root: Path) -> list[dict]:
    """The training records of the one run under a QAD_CHECKPOINT_ROOT (its JSONL log)."""
    records = []
    for path in sorted(root.glob("*/logs/*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if record.get("loss") is not None]


def qad_step(size_name: str) -> dict:
    """A real QAD job (bash launchers/qad.sh, one process): NVFP4 student (modelopt's kernels on
    CUDA, our emulation on a CPU), teacher kept in its bf16; the same job on CUDA and on the CPU
    must give the same losses (fp32 student, synthetic data, same seed)."""
    import torch

    size = SIZES[size_name]
    devices = ["cuda", "cpu"] if size_name == "full" and torch.cuda.is_available() else ["cpu", "cpu"]
    if size_name == "full" and devices[0] != "cuda":
        raise Skip("no CUDA device")
    work = Path(tempfile.mkdtemp(prefix="gpu-qad-"))
    checkpoint = work / "model"
    bf16_checkpoint(size.qad_model, checkpoint)
    rows = []
    for index, device in enumerate(devices):
        root = work / f"runs-{index}-{device}"
        conf = work / f"{index}.conf"
        settings = {"STUDENT_MODEL": size.qad_model, "TEACHER_MODEL": size.qad_model, "STUDENT_CKPT": checkpoint,
                    "TEACHER_CKPT": checkpoint, "TP_SIZE": 1, "NUM_GPUS": 1, "MBS": 1, "SEQ_LENGTH": size.qad_seq,
                    "DATASET_NAME": "synthetic", "TRAIN_ITERS": 3, "SAVE_INTERVAL": 3, "LR": "1e-5",
                    "PRECISION": "fp32", "GPU_TYPE": "h200", "QAD_CHECKPOINT_ROOT": root}
        conf.write_text("".join(f"export {key}={value}\n" for key, value in settings.items()))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="" if device == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
        started = time.perf_counter()
        done = subprocess.run(["bash", "launchers/qad.sh", "--config", str(conf)], cwd=REPO, env=env,
                              capture_output=True, text=True)
        print(done.stdout[-4000:], done.stderr[-4000:])
        if done.returncode:
            raise RuntimeError(f"QAD job on {device} exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        records = run_records(root)
        peaks = [r["memory_peak_gb"] for r in records if r.get("memory_peak_gb") is not None]
        rows.append({"device": device, "model": size.qad_model, "seq": size.qad_seq,
                     "losses": [round(r["loss"], 6) for r in records], "job_s": time.perf_counter() - started,
                     "step_s": median([r["iter_time_s"] for r in records]),
                     "peak_gb": max(peaks) if device == "cuda" and peaks else None})
    first, second = rows[0]["losses"], rows[1]["losses"]
    difference = max(abs(a - b) / abs(b) for a, b in zip(first, second, strict=True))
    rows[0]["max_relative_difference"] = difference
    if difference > 1e-2:
        raise AssertionError(f"QAD losses differ by {difference:.2e} (relative) between {devices}: {first} vs {second}")
    return {"rows": rows}


def loss_memory(size_name: str) -> dict:
    """Peak memory and time of one forward + backward of each loss at (tokens, vocab): the fused LM
    loss and the chunked KD loss against the naive losses on whole fp32 logits."""
    import torch
    import torch.nn.functional as F

    from train.distill.chunked import chunked_distill_loss
    from train.distill.loss import full_logits_loss
    from train.losses import linear_cross_entropy

    size, device = SIZES[size_name], pick_device(size_name)
    N, V, D = size.loss_tokens, size.loss_vocab, size.loss_hidden
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(N, D, device=device, generator=generator).requires_grad_()
    weight = (torch.randn(V, D, device=device, generator=generator) * 0.02).requires_grad_()
    teacher_hidden = torch.randn(N, D, device=device, generator=generator)
    teacher_weight = torch.randn(V, D, device=device, generator=generator) * 0.02
    targets = torch.randint(0, V, (N,), device=device, generator=generator)
    mask = torch.ones(N, device=device)
    distill = SimpleNamespace(temperature=1.0, lm_loss_weight=0.0, kd_loss_weight=1.0)
    losses = {
        "lm naive": lambda: F.cross_entropy(hidden @ weight.T, targets),
        "lm fused": lambda: linear_cross_entropy(hidden, weight, targets, mask),
        "kd naive": lambda: full_logits_loss(hidden @ weight.T, teacher_hidden @ teacher_weight.T, targets, mask,
                                             distill, None),
        "kd chunked": lambda: chunked_distill_loss(hidden, weight, teacher_hidden, teacher_weight, targets, mask),
    }
    rows = []
    for name, loss_fn in losses.items():
        release(device)
        before = allocated_gb(device)
        reset_peak(device)
        started = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        synchronize(device)
        seconds = time.perf_counter() - started
        peak = peak_gb(device)
        rows.append({"loss": name, "tokens": N, "vocab": V, "value": float(loss.detach()), "seconds": seconds,
                     "peak_extra_gb": peak - before if peak is not None else None})
        hidden.grad = weight.grad = None
    for naive, ours in ((0, 1), (2, 3)):
        a, b = rows[naive]["value"], rows[ours]["value"]
        if abs(a - b) > 1e-3 * max(1.0, abs(a)):
            raise AssertionError(f"{rows[ours]['loss']} = {b} but {rows[naive]['loss']} = {a}")
    return {"rows": rows}


def async_save(size_name: str) -> dict:
    """How long a checkpoint save blocks the training loop (train/checkpoint.py CheckpointManager):
    synchronous against checkpoint.async_save (dcp.async_save; synchronous without CUDA)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from train.checkpoint import CheckpointManager

    size, device = SIZES[size_name], pick_device(size_name)
    single_process_group(device)
    model, optimizer = build_trainable(size.save_model, device)
    timed_steps(model, optimizer, device, 1, 64, steps=1, warmup=0)  # AdamW state exists
    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optimizer": optimizer_state}
    gigabytes = sum(t.numel() * t.element_size() for t in model.parameters()) * 3 / GB
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-save-", dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as tmp:
        for asynchronous in (False, True):
            manager = CheckpointManager(Path(tmp) / f"async-{asynchronous}", keep_last=1, async_save=asynchronous)
            started = time.perf_counter()
            manager.save(1, tensors, {"iteration": 1})
            blocked = time.perf_counter() - started
            manager.finalize()
            rows.append({"async_save": asynchronous, "state_gb": gigabytes, "blocked_s": blocked,
                         "until_published_s": time.perf_counter() - started})
    return {"rows": rows}


PARTS = {"environment": environment, "max_micro_batch": max_micro_batch, "qad_step": qad_step,
         "loss_memory": loss_memory, "async_save": async_save}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", help="environment | gpu_tests | train_step:<variant> | max_micro_batch | qad_step | "
                                     "loss_memory | async_save")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    name, _, variant = args.part.partition(":")
    try:
        if name == "train_step":
            result = train_step(args.size, variant)
        elif name == "gpu_tests":
            result = gpu_tests(args.size, args.json.parent)
        else:
            result = PARTS[name](args.size)
        result["status"] = "ok"
    except Skip as reason:
        result = {"status": "skipped", "notes": [str(reason)]}
    args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
