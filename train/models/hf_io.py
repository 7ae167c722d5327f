"""load_hf / save_hf: HF checkpoint directories (config.json + safetensors) in and out.

Layout written by save_hf, as transformers writes it:
  config.json                          transformers' config class for the family, + dtype
  model.safetensors                    when everything fits in one shard, else
  model-0000k-of-0000n.safetensors     shards of at most max_shard_bytes each, and
  model.safetensors.index.json         {"metadata": {"total_size": bytes}, "weight_map": {key: file}}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from train.models.build import build_model
from train.models.common.transformer import CausalLM
from train.models.errors import CheckpointError
from train.models.family import family_spec
from train.models.registry import ModelArgs
from train.models.hf_adapters import (args_from_hf_config, check_hf_keys,
                                      from_hf_state_dict, hf_config_kwargs, to_hf_state_dict)

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{directory}: {INDEX_FILE} names shards that do not exist: {', '.join(absent)}")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}; only {SINGLE_FILE} or a sharded {INDEX_FILE} is read)" if others else ""
    raise CheckpointError(f"{directory}: no weights: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


# safetensors' dtype names (the header's "dtype" field) -> torch dtypes, floating ones only
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The floating dtype of an HF directory's weights (the first floating tensor's), read from the
    safetensors header without loading a tensor; None when it holds no floating tensor."""
    for file in _weight_files(Path(path)):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                dtype = _SAFETENSORS_FLOATS.get(handle.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return None


def hf_args(path: str | Path) -> ModelArgs:
    """The ModelArgs of an HF checkpoint directory's config.json (family from model_type)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json (not an HF checkpoint directory?)")
    config = json.loads((directory / "config.json").read_text())
    return args_from_hf_config(config, name=f"hf:{directory.resolve().name}")


def checked_checkpoint(directory: Path, args: ModelArgs) -> tuple[list[Path], dict[str, tuple[int, ...]]]:
    """(weight files, {HF key: shape}) once names and shapes match what a model of `args` expects,
    read from the safetensors headers only; CheckpointError names every problem at once."""
    files = _weight_files(directory)
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                found[key] = tuple(handle.get_slice(key).get_shape())
    meta_model = build_model(args, device="meta")
    expected = {k: tuple(v.shape) for k, v in to_hf_state_dict(meta_model.state_dict(), args).items()}
    problems = check_hf_keys(found, expected, args)
    if problems:
        raise CheckpointError(f"{directory}: checkpoint does not match {args.family} model: " + "; ".join(problems))
    return files, found


def load_hf(path: str | Path, dtype: torch.dtype | None = None, *, device: str | torch.device = "cpu",
            attention_backend: str = "sdpa") -> CausalLM:
    """Our model with the weights of an HF checkpoint directory (family from model_type), whole on
    this process (train/parallel/sharded_load.py reads only a rank's part).

    dtype=None keeps the checkpoint's floating dtype. Raises CheckpointError naming missing,
    unexpected and wrongly shaped keys all at once, ModelConfigError for unsupported configs.
    """
    directory = Path(path)
    args = hf_args(directory)
    files, _ = checked_checkpoint(directory, args)  # before reading any tensor

    hf_state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            hf_state.update({key: handle.get_tensor(key) for key in handle.keys()})
    if dtype is None:
        dtype = next(t.dtype for t in hf_state.values() if t.is_floating_point())
    state = from_hf_state_dict(hf_state, args)
    if args.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state = {key: value.to(device=device, dtype=dtype).contiguous() for key, value in state.items()}
    model = build_model(args, device="meta", dtype=dtype, attention_backend=attention_backend)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.init_buffers()
    return model


def save_hf(model: CausalLM, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json + safetensors that transformers' AutoModelForCausalLM loads."""
    from transformers import AutoConfig  # only the writer needs transformers

    args, directory = model.args, Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = model.embed_tokens.weight.dtype
    spec = family_spec(args.family)
    config = AutoConfig.for_model(spec.model_type, **hf_config_kwargs(args))
    config.architectures = [spec.hf_architecture]
    # transformers >= 4.56 names the field `dtype` (`torch_dtype` before, now deprecated).
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    config.save_pretrained(directory)

    state = {k: v.detach().to("cpu").contiguous() for k, v in to_hf_state_dict(model.state_dict(), args).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return directory
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
    return directory
