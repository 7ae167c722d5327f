"""KD_CFG_PATH: a YAML of KD loss settings merged into cfg.distill, and the vocabulary rule.

    python -m pytest tests/unit/test_distill_kd_config.py

The file (every key optional):

    temperature: 2.0          # T > 0: KL(teacher || student) of softmax(z / T), scaled by T^2
    lm_loss_weight: 0.5       # >= 0: weight of the cross entropy on the data's next tokens
    chunk_size: 1024          # >= 1: token positions per chunk of the KD loss (memory bound)
    tokenizer_vocab_size: 151669   # real tokens; only needed when the two vocabularies differ

Megatron-LM / modelopt KD files work too: `logit_kl_temperature` is `temperature`;
`skip_lm_loss: true` is `lm_loss_weight: 0` (false: 1.0); `kd_loss_scale` must be 1.0;
`logit_layers` must name the output layers and `intermediate_layer_pairs` be empty (logit
distillation is what this engine does). Any other key, or a bad value, is one error naming
the file and the key. Torch-free: the launch plan checks the file before a job starts.

Vocabulary rule (resolve_vocab): equal vocabularies compare on all logits. Different ones are
accepted only when both cover the tokenizer (`tokenizer_vocab_size`, else the size of the
tokenizer saved with the teacher or student checkpoint) and differ only in padding rows past
it (as Qwen3's 151936 rows pad 151669 tokens): KL and LM loss then use the first
tokenizer_vocab_size logits of both models. Otherwise the job stops at start naming both sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import DistillConfig, JobConfig

KEYS = ("temperature", "lm_loss_weight", "chunk_size", "tokenizer_vocab_size")
MEGATRON_KEYS = ("logit_kl_temperature", "skip_lm_loss", "kd_loss_scale", "logit_layers",
                 "intermediate_layer_pairs")


class KDConfigError(ValueError):
    """A bad KD_CFG_PATH file or a vocabulary the KD loss cannot compare."""


def _number(path, key, value, *, integer=False, minimum=None, exclusive=False):
    wanted = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        kind = "an integer" if integer else "a number"
        raise KDConfigError(f"KD_CFG_PATH {path}: {key}: expected {kind}, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        bound = f"> {minimum}" if exclusive else f">= {minimum}"
        raise KDConfigError(f"KD_CFG_PATH {path}: {key}: must be {bound}, got {value!r}")
    return value


def load_kd_config(path: str) -> dict:
    """The settings of the YAML at `path` under this engine's key names (only those it sets)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise KDConfigError(f"KD_CFG_PATH {path}: file does not exist") from None
    except yaml.YAMLError as error:
        raise KDConfigError(f"KD_CFG_PATH {path}: not valid YAML: {error}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise KDConfigError(f"KD_CFG_PATH {path}: expected a mapping of settings, got {type(raw).__name__}")
    unknown = [key for key in raw if key not in KEYS + MEGATRON_KEYS]
    if unknown:
        raise KDConfigError(f"KD_CFG_PATH {path}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)}; "
                            f"Megatron's {', '.join(MEGATRON_KEYS)})")
    settings = {}
    if "logit_kl_temperature" in raw:
        if "temperature" in raw:
            raise KDConfigError(f"KD_CFG_PATH {path}: logit_kl_temperature: give temperature or it, not both")
        settings["temperature"] = raw["logit_kl_temperature"]
    if "skip_lm_loss" in raw:
        if not isinstance(raw["skip_lm_loss"], bool):
            raise KDConfigError(f"KD_CFG_PATH {path}: skip_lm_loss: expected true or false, got {raw['skip_lm_loss']!r}")
        if "lm_loss_weight" in raw:
            raise KDConfigError(f"KD_CFG_PATH {path}: skip_lm_loss: give lm_loss_weight or it, not both")
        settings["lm_loss_weight"] = 0.0 if raw["skip_lm_loss"] else 1.0
    if "kd_loss_scale" in raw and _number(path, "kd_loss_scale", raw["kd_loss_scale"]) != 1:
        raise KDConfigError(f"KD_CFG_PATH {path}: kd_loss_scale: only 1.0 is supported "
                            f"(scale lm_loss_weight instead), got {raw['kd_loss_scale']!r}")
    if raw.get("intermediate_layer_pairs"):
        raise KDConfigError(f"KD_CFG_PATH {path}: intermediate_layer_pairs: only logit distillation is "
                            "supported; leave it empty")
    layers = raw.get("logit_layers")
    if layers is not None and (not isinstance(layers, list) or
                               any(name not in ("output_layer", "lm_head") for name in layers)):
        raise KDConfigError(f"KD_CFG_PATH {path}: logit_layers: only the output layers "
                            f"(output_layer / lm_head) are supported, got {layers!r}")
    settings.update({key: raw[key] for key in KEYS if key in raw})
    if "temperature" in settings:
        _number(path, "temperature" if "temperature" in raw else "logit_kl_temperature", settings["temperature"],
                minimum=0, exclusive=True)
    if "lm_loss_weight" in settings:
        _number(path, "lm_loss_weight", settings["lm_loss_weight"], minimum=0)
    if "chunk_size" in settings:
        _number(path, "chunk_size", settings["chunk_size"], integer=True, minimum=1)
    if "tokenizer_vocab_size" in settings:
        _number(path, "tokenizer_vocab_size", settings["tokenizer_vocab_size"], integer=True, minimum=1)
    return settings


def apply_kd_config(distill_cfg: DistillConfig) -> None:
    """Merges the file at distill_cfg.kd_config_path (if any) into distill_cfg, in place."""
    path = distill_cfg.kd_config_path
    if not path:
        return
    for key, value in load_kd_config(str(path)).items():
        setattr(distill_cfg, key, value)


def tokenizer_size(directory: str | None) -> int | None:
    """len(tokenizer) of the HF tokenizer saved in `directory` (tokenizer.json), None without one."""
    if not directory or not (Path(directory) / "tokenizer.json").is_file():
        return None
    data = json.loads((Path(directory) / "tokenizer.json").read_text())
    ids = set(data.get("model", {}).get("vocab", {}).values()) if isinstance(data.get("model", {}).get("vocab"), dict) \
        else set(range(len(data.get("model", {}).get("vocab", []))))
    ids.update(token["id"] for token in data.get("added_tokens", []))
    return max(ids) + 1 if ids else None


def resolve_vocab(student_vocab: int, teacher_vocab: int, tokenizer_vocab_size: int | None) -> int | None:
    """None: compare all logits (equal vocabularies). An int: compare the first that many logits.

    Raises KDConfigError naming both sizes when the vocabularies differ by more than padding."""
    if student_vocab == teacher_vocab:
        return None
    if tokenizer_vocab_size is None:
        raise KDConfigError(f"vocabulary mismatch: student has {student_vocab} logits, teacher {teacher_vocab}; "
                            "set tokenizer_vocab_size in KD_CFG_PATH (or save the tokenizer with the teacher) "
                            "if they differ only by padding past the tokenizer's size")
    if tokenizer_vocab_size > min(student_vocab, teacher_vocab):
        raise KDConfigError(f"vocabulary mismatch: student has {student_vocab} logits, teacher {teacher_vocab}, "
                            f"tokenizer {tokenizer_vocab_size} tokens: the smaller model does not cover the tokenizer")
    return tokenizer_vocab_size


def hf_vocab_size(directory: str) -> int:
    """vocab_size from an HF checkpoint's config.json (no weights loaded)."""
    config = Path(directory) / "config.json"
    try:
        data = json.loads(config.read_text())
        return int(data.get("vocab_size") or data["text_config"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KDConfigError(f"{config}: cannot read vocab_size ({error})") from None


def check_distill_config(cfg: JobConfig) -> int | None:
    """At QAD job start, before any model is built: merge KD_CFG_PATH, apply the vocabulary rule.

    Returns the vocabulary the KD loss compares on (None: all logits); raises KDConfigError."""
    distill = cfg.distill
    apply_kd_config(distill)
    student_dir, teacher_dir = cfg.model.hf_checkpoint, distill.teacher_checkpoint
    if not student_dir or not teacher_dir:
        return None
    student_vocab, teacher_vocab = hf_vocab_size(student_dir), hf_vocab_size(teacher_dir)
    if student_vocab == teacher_vocab:
        return None
    known = distill.tokenizer_vocab_size or tokenizer_size(teacher_dir) or tokenizer_size(student_dir)
    return resolve_vocab(student_vocab, teacher_vocab, known)
