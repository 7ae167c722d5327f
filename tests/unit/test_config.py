"""python -m pytest tests/unit/test_config.py  (the typed config: train/config.py)"""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.config import DistillConfig, JobConfig, OptimConfig, ParallelConfig, QuantConfig, to_job_config
from train.launch.plan import compose_config

REPO = Path(__file__).resolve().parents[2]


def test_a_composed_config_becomes_the_typed_tree_with_its_values():
    composed = compose_config("qad", ["model.name=s", "model.hf_checkpoint=/m/s", "parallel.data_parallel=fsdp",
                                      "quant.recipe=fp8", "training.micro_batch_size=3"])
    cfg = to_job_config(composed)
    assert type(cfg) is JobConfig and type(cfg.optim) is OptimConfig and type(cfg.distill) is DistillConfig
    assert (cfg.job, cfg.model.name, cfg.model.hf_checkpoint) == ("qad", "s", "/m/s")
    assert cfg.parallel == ParallelConfig(data_parallel="fsdp")  # every other key: the schema's default
    assert cfg.quant == QuantConfig(recipe="fp8") and cfg.training.micro_batch_size == 3
    assert cfg.optim.lr == 1e-6 and cfg.optim.schedule == "constant"  # configs/optim/qad.yaml


def test_the_former_groups_are_schema_defaults_now():
    cfg = to_job_config(compose_config("qad", ["model.name=s", "model.hf_checkpoint=/m/s"]))
    assert cfg.parallel.data_parallel == "ddp" and cfg.parallel.backend == "auto" and cfg.quant.recipe == "nvfp4"
    assert to_job_config(compose_config("pretrain", [])).model.name == "tiny-qwen3"
    assert not any((REPO / "configs" / group).exists() for group in ("parallel", "quant", "model"))


def test_a_hand_built_config_gets_the_schema_defaults():
    cfg = to_job_config(OmegaConf.create({"job": "pretrain", "model": {"name": "tiny-qwen3"},
                                          "checkpoint": {"keep_last": 1}}))
    assert cfg.checkpoint.keep_last == 1 and cfg.checkpoint.keep_every == 0
    assert cfg.training.max_bad_iterations == 5 and cfg.lora.quantized_base is None
    assert to_job_config({"job": "qad", "model": {"name": "m"}}).distill.chunk_size == 512


def test_a_typed_config_comes_back_as_it_is():
    cfg = JobConfig(job="pretrain")
    assert to_job_config(cfg) is cfg


def test_the_resolved_yaml_reads_back_to_the_same_tree():
    """What the run directory and each checkpoint hold (config.yaml), and what export/compare read."""
    cfg = to_job_config(compose_config("pretrain", ["optim.lr=0.002", "training.debug_nan_at_iteration='3-4'"]))
    assert to_job_config(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))) == cfg


@pytest.mark.parametrize("raw,key", [
    ({"job": "pretrain", "model": {"name": "m"}, "optim": {"learning_rate": 1.0}}, "optim.learning_rate"),
    ({"job": "pretrain", "model": {"name": "m"}, "training": {"micro_batch_size": "two"}}, "training.micro_batch_size"),
    ({"job": "pretrain"}, "model.name"),  # ??? left
])
def test_bad_configs_raise_naming_the_key(raw, key):
    with pytest.raises(OmegaConfBaseException) as error:
        to_job_config(OmegaConf.create(raw))
    assert error.value.full_key == key


def test_no_config_section_is_read_with_a_default_of_its_own():
    """Schema defaults are the only defaults: no cfg.x.get("key", default), no hasattr on configs."""
    pattern = re.compile(r"\b(cfg(\.\w+)+|\w+_cfg)\.get\(|hasattr\(\w*cfg|getattr\(\w*cfg\w*, \"\w+\", ")
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in sorted((REPO / "train").rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
