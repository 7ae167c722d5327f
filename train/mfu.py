"""Model FLOPs utilization: achieved FLOP/s per device over the device's peak bf16 dense FLOP/s.

    MFU = flops_per_token(model args, seq_len) x tokens/s per device / peak bf16 FLOP/s

flops_per_token is the PaLM count from train/models/registry.py (forward + backward, no
activation recomputation). The peak comes from PEAK_BF16_FLOPS, matched on
torch.cuda.get_device_name(); unknown GPUs and CPUs have no peak, so MFU is None
(null in the JSONL, "n/a" on the console). PEAK_FLOPS=<FLOP/s> in the environment
overrides the table (a GPU missing from it, or a deliberate reference).
"""

import os

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s.
# Order matters: the first key contained in the lowercased device name wins, so more
# specific names come before their prefixes ("a100" after "h100"; "l40s" before "l40").
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("gb200", 2500e12),
    ("b200", 2250e12),
    ("b100", 1750e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM / NVL
    ("h800", 989e12),
    ("gh200", 989e12),
    ("h20", 148e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("a6000", 154.8e12),  # RTX A6000
    ("rtx 6000 ada", 364.2e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("a40", 149.7e12),
    ("a30", 165e12),
    ("a10g", 70e12),
    ("a10", 125e12),
    ("l4", 121e12),
    ("rtx 4090", 165.2e12),
    ("rtx 3090", 71e12),
    ("v100", 125e12),  # fp16 tensor cores (no bf16 on Volta)
    ("mi300x", 1307e12),
    ("mi250x", 383e12),
]


def peak_flops_for_name(device_name: str | None) -> float | None:
    """Peak bf16 dense FLOP/s of a device by its name; None when unknown."""
    if not device_name:
        return None
    name = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def device_peak_flops(device: str) -> float | None:
    """Peak of this process's device ('cpu' or 'cuda:<n>'); PEAK_FLOPS overrides."""
    override = os.environ.get("PEAK_FLOPS")
    if override:
        return float(override)
    if not str(device).startswith("cuda"):
        return None
    import torch

    return peak_flops_for_name(torch.cuda.get_device_name(torch.device(device)))


def model_flops_per_token(model, seq_len: int) -> float | None:
    """Training FLOPs per token of a (possibly DDP/FSDP-wrapped) registry model; None without args."""
    from train.models.registry import flops_per_token

    inner = getattr(model, "module", model)
    args = getattr(inner, "args", None)
    if args is None:
        return None
    return flops_per_token(args, seq_len)


def mfu(flops_per_token: float | None, tokens_per_s_per_device: float, peak_flops: float | None) -> float | None:
    """Fraction of the peak (0.42 = 42 %); None when either FLOP count is unknown."""
    if not flops_per_token or not peak_flops or tokens_per_s_per_device <= 0:
        return None
    return flops_per_token * tokens_per_s_per_device / peak_flops
