"""Rotary position embeddings (half-rotation layout of HF LLaMA/Qwen3 checkpoints)."""

import math

import torch


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies, with LLaMA 3.1's frequency-band scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None or scaling.get("rope_type", "default") == "default":
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor = scaling["factor"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = original_len / low_freq_factor, original_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cache(max_seq_len: int, head_dim: int, theta: float, scaling: dict | None = None,
               device=None) -> torch.Tensor:
    """(max_seq_len, 2, head_dim) float32: cos and sin per position, halves duplicated."""
    inv_freq = rope_inverse_frequencies(head_dim, theta, scaling).to(device)
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim)
    return torch.stack((angles.cos(), angles.sin()), dim=1)


def rope_for_positions(cache: torch.Tensor, seq_len: int, position_ids: torch.Tensor | None,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin broadcastable to (B, T, n_heads, head_dim), in the activation dtype."""
    if position_ids is None:
        if seq_len > cache.shape[0]:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {cache.shape[0]}")
        table = cache[:seq_len].unsqueeze(0)  # (1, T, 2, head_dim)
    else:
        table = cache[position_ids]  # (B, T, 2, head_dim)
    table = table.to(dtype).unsqueeze(3)  # (B, T, 2, 1, head_dim)
    return table[:, :, 0], table[:, :, 1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, n_heads, head_dim); rotates the two halves of head_dim as pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
