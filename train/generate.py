"""Greedy decoding with our CausalLM: batched, stops at end-of-sequence ids or max_new_tokens.

    python -m pytest tests/unit/test_lora.py -k generate

The models take no attention mask, so a batch never holds padding: prompts are grouped by
token length and each group of equal length decodes together (every sequence grows by one
token per step, so the group stays rectangular). No KV cache: each step runs the whole
sequence again, O(T^2) per answer; fine for validation answers of a few dozen tokens.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                    batch_size: int = 8, device: str | torch.device = "cpu") -> list[list[int]]:
    """The new tokens of each prompt (prompt order), up to and without the first stop id."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if any(not prompt for prompt in prompts):
        raise ValueError("greedy_generate: an empty prompt")
    max_len = getattr(getattr(model, "args", None), "max_seq_len", None)
    was_training = model.training
    model.eval()
    by_length = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    results: list[list[int]] = [[] for _ in prompts]
    try:
        for length, indices in sorted(by_length.items()):
            for first in range(0, len(indices), batch_size):
                chunk = indices[first:first + batch_size]
                tokens = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)  # (B, T)
                steps = max_new_tokens if max_len is None else min(max_new_tokens, max_len - length)
                for row, answer in zip(chunk, _decode(model, tokens, steps, stop_ids)):
                    results[row] = answer
    finally:
        model.train(was_training)
    return results


def _decode(model: nn.Module, tokens: torch.Tensor, steps: int, stop_ids: set[int]) -> list[list[int]]:
    prompt_length = tokens.shape[1]
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=tokens.device)
    for _ in range(steps):
        next_token = model(tokens)[:, -1].float().argmax(dim=-1)  # (B,) from logits (B, T, vocab)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        done |= torch.isin(next_token, stops)
        if bool(done.all()):
            break
    answers = []
    for row in tokens[:, prompt_length:].tolist():
        cut = next((position for position, token in enumerate(row) if token in stop_ids), len(row))
        answers.append(row[:cut])
    return answers
