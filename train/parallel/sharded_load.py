"""load_hf_sharded: each rank reads only its own part of every tensor of an HF checkpoint.

    python -m pytest tests/integration/test_sharded_load.py

The model is built on the meta device and parallelized first (TP, EP, FSDP2: train/parallel/),
so every parameter already knows which part of the global tensor this rank holds:
    plain tensor            the whole tensor (one process, DDP replicas)
    DTensor                 compute_local_shape_and_global_offset(global shape, mesh, placements):
                            FSDP2 Shard(0), TP Shard(0)/Shard(1), both (2-D mesh), Replicate
    EP expert (plain)       (E/EP, ...) of (E, ...): experts [ep_rank * E/EP, ...) (expert_parallel.py)
Then the model is materialized (to_empty: uninitialized memory, local shapes only) and each
local tensor is filled from safetensors' get_slice(key)[rows, cols], which reads those bytes
from the memory-mapped file and nothing else. The checkpoint's dtype (bf16) is converted into
the parameter's (fp32 master weights) one slice at a time, so no rank ever holds a whole
model, only the largest slice of one tensor in transit.

HF -> ours per family (a Source per parameter of ours, in our global coordinates):
    llama, qwen3, ...       Stored("model." + name): the same tensor under another name
    gpt2                    Stored(hf, transposed): Conv1D weights are (in, out);
                            q/k/v: rows [offset, offset + width) of the fused c_attn, transposed
    MoE experts on disk     per expert (E x gate (F, D), up (F, D), down (D, F)): Experts, which
                            stacks the experts of the local range and joins gate|up rows
    tied embeddings         lm_head.weight is embed_tokens.weight (one parameter, read once)
    LoRA (peft)             `q_proj.base_layer.weight` is q_proj.weight; the adapters, not in the
                            checkpoint, are copied from `initial` (their whole initial values)
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

from train.models.hf_adapters import PER_EXPERT, gpt2_renames
from train.models.registry import ModelArgs
from train.parallel.expert_parallel import expert_parallel_state

Region = tuple[slice, ...]  # one slice per dim, in the global tensor's coordinates


@dataclass(frozen=True)
class Stored:
    """A tensor of ours that is (a row range of) one checkpoint tensor, maybe transposed."""

    key: str
    transposed: bool = False  # HF Conv1D weight (in, out): ours is its transpose
    row_offset: int = 0  # our row 0 is the stored row row_offset (fused q|k|v of GPT-2)

    def read(self, handles: dict, region: Region) -> torch.Tensor:
        rows, *rest = region
        rows = slice(rows.start + self.row_offset, rows.stop + self.row_offset)
        if self.transposed:  # ours (out, in) = stored (in, out).t(): read [cols, rows] of the stored one
            return handles[self.key].get_slice(self.key)[rest[0], rows].t()
        return handles[self.key].get_slice(self.key)[(rows, *rest)]


@dataclass(frozen=True)
class Experts:
    """A grouped expert tensor (E, rows, cols) of ours from per-expert tensors on disk: for each
    expert the parts stacked along rows (gate_up_proj: gate (F, D) then up (F, D))."""

    parts: tuple[tuple[str, ...], ...]  # [expert][part] -> checkpoint key
    part_rows: int  # rows of each part (F for gate/up, D for down)

    def read(self, handles: dict, region: Region) -> torch.Tensor:
        experts, rows, cols = region
        per_expert = []
        for keys in self.parts[experts]:
            pieces = []
            for index, key in enumerate(keys):  # the part's rows [first, first + part_rows)
                first = index * self.part_rows
                start, stop = max(rows.start, first), min(rows.stop, first + self.part_rows)
                if start < stop:
                    pieces.append(handles[key].get_slice(key)[start - first:stop - first, cols])
            per_expert.append(torch.cat(pieces))
        return torch.stack(per_expert)


# ----------------------------------------------------------------- HF names -> sources

def _decoder_sources(args: ModelArgs, names: list[str], found: set[str]) -> dict:
    """LLaMA-style families: 'model.' + our name; experts per expert on disk (or grouped)."""
    per_expert = {m.group(1) for m in map(PER_EXPERT.match, found) if m}  # "model.layers.N.mlp.experts"
    sources = {}
    for name in names:
        hf = name if name == "lm_head.weight" else f"model.{name}"
        prefix, _, kind = hf.rpartition(".")
        if prefix in per_expert and kind in ("gate_up_proj", "down_proj"):
            projections = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
            parts = tuple(tuple(f"{prefix}.{j}.{p}.weight" for p in projections) for j in range(args.num_experts))
            rows = args.moe_intermediate_size if kind == "gate_up_proj" else args.hidden_size
            sources[name] = Experts(parts, rows)
        else:
            sources[name] = Stored(hf)
    return sources


def _gpt2_sources(args: ModelArgs, names: list[str], found: set[str]) -> dict:
    """GPT-2: renames (hf_adapters.gpt2_renames), Conv1D transposes, q/k/v from c_attn."""
    sources = {ours: Stored(hf, transposed) for ours, hf, transposed in gpt2_renames(args)}
    widths = [args.num_heads * args.head_dim] + 2 * [args.num_kv_heads * args.head_dim]
    offsets = [0, widths[0], widths[0] + widths[1]]
    for i in range(args.num_layers):
        for p, offset in zip("qkv", offsets):
            fused = f"transformer.h.{i}.attn.c_attn"
            sources[f"layers.{i}.self_attn.{p}_proj.weight"] = Stored(f"{fused}.weight", True, offset)
            sources[f"layers.{i}.self_attn.{p}_proj.bias"] = Stored(f"{fused}.bias", False, offset)
    sources["lm_head.weight"] = Stored("lm_head.weight")
    if not any(key.startswith("transformer.") for key in found):  # a bare GPT2Model checkpoint
        sources = {ours: Stored(s.key.removeprefix("transformer."), s.transposed, s.row_offset)
                   for ours, s in sources.items()}
    return {name: sources[name] for name in names}


def checkpoint_sources(args: ModelArgs, names: list[str], found: set[str]) -> dict:
    """{our parameter name: Stored | Experts} for every name; tied lm_head reads the embedding."""
    build = _gpt2_sources if args.family == "gpt2" else _decoder_sources
    sources = build(args, [n for n in names if not (args.tie_embeddings and n == "lm_head.weight")], found)
    if args.tie_embeddings and "lm_head.weight" in names:  # the last pipeline stage has no embed_tokens
        sources["lm_head.weight"] = build(args, ["embed_tokens.weight"], found)["embed_tokens.weight"]
    return sources


# ----------------------------------------------------------------- this rank's part

_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module\.|_orig_mod\.|^module\.|base_layer\.)")


def our_name(name: str) -> str:
    """A parameter's name without wrapper prefixes (activation checkpointing, compile, DDP, peft's LoRA layer)."""
    return _WRAPPERS.sub("", name)


def local_part(name: str, parameter: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, Region]:
    """(this rank's tensor to fill, its region of the global tensor)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(parameter, DTensor):
        shape, offset = compute_local_shape_and_global_offset(parameter.shape, parameter.device_mesh,
                                                              parameter.placements)
        local = parameter._local_tensor  # FSDP2: a view of its (padded) shard storage
    else:
        local, shape, offset = parameter, tuple(parameter.shape), (0,) * parameter.ndim
        state = expert_parallel_state(model)  # EP: plain (E/EP, ...) expert tensors
        if state is not None and our_name(name) in state.expert_names:
            offset = (state.ep_mesh.get_local_rank() * shape[0],) + offset[1:]
    return local, tuple(slice(o, o + s) for o, s in zip(offset, shape))


def local_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters (each local shard, tied ones once)."""
    return sum(local_part(n, p, model)[0].numel() * p.element_size() for n, p in model.named_parameters())


# ----------------------------------------------------------------- the load

@torch.no_grad()
def load_hf_sharded(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", initial: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Materialize a meta-device, already parallelized CausalLM on `device` and fill each rank's
    part of every parameter from the HF checkpoint directory `path`. Returns the model.

    dtype: what the parameters hold (None: the model's own dtype, as built on meta); the
    checkpoint's dtype is converted slice by slice. The checkpoint must match the model's
    ModelArgs (the same checks as load_hf, CheckpointError naming the keys).
    initial: parameters the checkpoint does not hold (LoRA adapters), our name -> the whole
    tensor they start from; each rank copies its part."""
    from train.models.hf_io import checked_checkpoint

    args: ModelArgs = model.args
    files, found = checked_checkpoint(Path(path), args)
    if dtype is not None:
        model.to(dtype)  # on meta: costs nothing
    model.to_empty(device=device)
    model.tie_weights()
    model.init_buffers()
    initial = initial or {}
    names = [(name, parameter) for name, parameter in model.named_parameters()]
    sources = checkpoint_sources(args, [our_name(n) for n, _ in names if our_name(n) not in initial], set(found))
    with contextlib.ExitStack() as stack:
        handles = {}  # checkpoint key -> its file's open safe_open handle (memory-mapped)
        for file in files:
            handle = stack.enter_context(safe_open(file, framework="pt"))
            handles.update(dict.fromkeys(handle.keys(), handle))
        for name, parameter in names:
            local, region = local_part(name, parameter, model)
            if local.numel() and our_name(name) in initial:
                local.copy_(initial[our_name(name)][region])
            elif local.numel():
                local.copy_(sources[our_name(name)].read(handles, region))
    return model
