"""python -m pytest tests/unit/test_launch_plan.py  (the job plan and its CLI: train/launch/plan.py; the plan file
the workers read: train/launch/job.py)"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.fixtures.synthetic_data import write_random_documents
from train.data.blend import train_samples_for_blend
from train.data.errors import DataError
from train.launch.cluster import ClusterEnv
from train.launch.conf import CONF_VARIABLES, ConfError, config_overrides
from train.launch.job import current_resume, plan_from_rank0, read_plan_file
from train.launch.plan import (
    JobPlan,
    PlanError,
    compose_config,
    conf_hydra_overrides,
    config_fingerprint,
    hydra_value,
    main,
    node_command,
    plan_from_conf,
    shell_exports,
)
from train.launch.rundir import TRACKER_FILE, RunPaths

REPO = Path(__file__).resolve().parents[2]
STAMP = "20250102_030405"
SEQ = 64
TINY_PRETRAIN = ("export MODEL=tiny-qwen3\nexport DATASET_NAME=synthetic\nexport SEQ_LENGTH=64\n"
                 "export MBS=2\nexport NUM_GPUS=2\n")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Built once: a real tiny-qwen3 HF checkpoint and a real datablend of two .bin/.idx prefixes."""
    root = tmp_path_factory.mktemp("assets")
    from train.models import build_model, init_weights, save_hf

    save_hf(init_weights(build_model("tiny-qwen3", device="cpu"), 0), str(root / "models" / "tiny-qwen3"))
    data = root / "data"
    data.mkdir()
    a = write_random_documents(str(data / "a_text_document"), 60, 50, 1000, 0, 1)
    b = write_random_documents(str(data / "b_text_document"), 30, 120, 1000, 0, 2)
    (data / "datablend_mix.json").write_text(json.dumps({"train": [0.7, a, 0.3, b], "valid": [1.0, b]}))
    (data / "datablend_one.json").write_text(json.dumps({"train": [1.0, a]}))
    (data / "datablend_validonly.json").write_text(json.dumps({"valid": [1.0, a]}))
    (data / "datablend_broken.json").write_text(json.dumps({"train": [1.0, str(data / "missing_document")]}))
    return {"models": root / "models", "ckpt": root / "models" / "tiny-qwen3", "data": data, "a": a, "b": b}


@pytest.fixture(autouse=True)
def clean_os_env(monkeypatch):
    """main() reads os.environ: nothing from the outer shell or a SLURM job may leak in."""
    for name in list(os.environ):
        if (name.startswith("SLURM_") or name in CONF_VARIABLES or name in ("RUN_DATETIME", "HF_TOKEN")):
            monkeypatch.delenv(name)


@pytest.fixture
def env(tmp_path):
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "QAD_CHECKPOINT_ROOT": str(tmp_path / "runs"), "DATACACHE_DIR": str(tmp_path / "data"),
            "RUN_DATETIME": STAMP}


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch):
    """os.environ's PATH holds bash but no scontrol: SLURM mode without a controller to ask."""
    bin_dir = tmp_path / "bin-no-scontrol"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    monkeypatch.setenv("PATH", str(bin_dir))
    assert shutil.which("scontrol") is None


def write_conf(directory: Path, text: str, name: str = "test.conf") -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def qad_conf(ckpt: Path, teacher: Path | None = None, extra: str = "") -> str:
    return (f"export STUDENT_MODEL=tiny-qwen3\nexport TEACHER_MODEL=tiny-qwen3\n"
            f"export STUDENT_CKPT='{ckpt}'\nexport TEACHER_CKPT='{teacher or ckpt}'\n"
            f"export TP_SIZE=1\nexport MBS=2\nexport NUM_GPUS=2\nexport SEQ_LENGTH={SEQ}\n" + extra)


def tokens_on_disk(prefix: str) -> int:
    return os.path.getsize(prefix + ".bin") // 2  # uint16: vocabulary 1000


# ----------------------------------------------------------------- parallel sizes

def test_tp_times_pp_must_divide_the_gpus(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export NUM_GPUS=8\nexport TP_SIZE=3\n")
    with pytest.raises(PlanError) as error:
        plan_from_conf("pretrain", conf, [], env)
    message = str(error.value)
    assert conf in message and "TP_SIZE x PP_SIZE = 3 x 1 = 3" in message and "8 GPUs" in message


def test_wandb_settings_come_from_the_conf_and_a_bad_mode_is_refused(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export WANDB_PROJECT=qad-sweep\nexport WANDB_MODE=offline\n")
    command = plan_from_conf("pretrain", conf, [], env)[0].node_commands[0]
    assert "logging.wandb_project=qad-sweep" in command and "logging.wandb_mode=offline" in command
    with pytest.raises(PlanError, match="WANDB_MODE='ofline' .* is not one of online, offline, disabled"):
        plan_from_conf("pretrain", conf, ["WANDB_MODE=ofline"], env)


def test_tp_leaves_the_data_parallel_size(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export NUM_GPUS=8\nexport TP_SIZE=2\nexport DP_SHARDING=fsdp\n")
    assert plan_from_conf("pretrain", conf, [], env)[0].data_parallel_size == 4
    plan = plan_from_conf("pretrain", conf, [], env, nnodes=3)[0]
    assert plan.cluster.world_size == 24 and plan.data_parallel_size == 12


PP_PRETRAIN = TINY_PRETRAIN.replace("MODEL=tiny-qwen3", "MODEL=tiny-llama3") + "export NUM_GPUS=8\nexport PP_SIZE=2\n"


def test_pipeline_parallelism_leaves_the_data_parallel_size(tmp_path, env):
    """8 GPUs / PP 2 = 4 data-parallel ranks; GBS 16 = MBS 2 x 4 x 2 micro-batches, one per stage."""
    conf = write_conf(tmp_path, PP_PRETRAIN + "export GBS=16\n")
    plan = plan_from_conf("pretrain", conf, [], env)[0]
    assert plan.data_parallel_size == 4 and plan.parallel["pipeline_parallel"] == 2


@pytest.mark.parametrize("extra, job, message", [
    ("export GBS=8\n", "pretrain", "PP_SIZE=2 needs at least 2 micro-batches per step \\(1F1B\\), the plan has "
     "GBS / \\(MBS x data-parallel size\\) = 1"),
    ("export GBS=16\nexport PP_SIZE=3\n", "pretrain", "TP_SIZE x PP_SIZE = 1 x 3 = 3 does not divide the 8 GPUs"),
    ("export GBS=16\nexport PP_LAYERS=3,3\n", "pretrain", "parallel.pipeline_layers='3,3'"),
])
def test_pipeline_plans_that_cannot_run_are_refused(tmp_path, env, extra, job, message):
    conf = write_conf(tmp_path, PP_PRETRAIN + extra)
    with pytest.raises(PlanError, match=message):
        plan_from_conf(job, conf, [], env)


INTERLEAVED = "export PP_SCHEDULE=interleaved_1f1b\nexport PP_VIRTUAL_STAGES=2\n"


@pytest.mark.parametrize("extra, message", [
    ("export GBS=40\n", "PP_SCHEDULE=interleaved_1f1b: interleaved 1F1B splits the 5 micro-batches per step into 2 "
     "rounds \\(micro-batches // PP_SIZE=2\\), which must divide them; use a multiple of PP_SIZE \\(GBS / "
     "\\(MBS x data-parallel size\\) = 5\\)"),
    ("export GBS=16\nexport PP_VIRTUAL_STAGES=1\n", "interleaving needs at least 2 stages per rank"),
    ("export GBS=16\nexport PP_LAYERS=2,2\n", "needs PP_SIZE x PP_VIRTUAL_STAGES = 2 x 2 = 4 counts"),
])
def test_interleaved_pipeline_plans_that_cannot_run_are_refused(tmp_path, env, extra, message):
    """8 GPUs, PP 2, MBS 2: dp 4, GBS 40 gives 5 micro-batches, which torch's 2 rounds cannot split."""
    conf = write_conf(tmp_path, PP_PRETRAIN + INTERLEAVED + extra)
    with pytest.raises(PlanError, match=message):
        plan_from_conf("pretrain", conf, [], env)
    assert plan_from_conf("pretrain", write_conf(tmp_path, PP_PRETRAIN + INTERLEAVED + "export GBS=48\n"), [],
                          env)[0].parallel["pipeline_parallel"] == 2  # 6 micro-batches: 3 rounds of 2


@pytest.mark.parametrize("sharding", ["fsdp", "fsdp_zero2"])
def test_interleaved_pipeline_plans_with_fsdp2_stages_are_accepted(tmp_path, env, sharding):
    """8 GPUs, PP 2 x 2 virtual stages: FSDP2 shards each stage over its 4 data-parallel ranks, and
    the communication plan reduce-scatters every micro-batch's gradients (pipeline.py StageChunk)."""
    conf = write_conf(tmp_path, PP_PRETRAIN + INTERLEAVED + f"export GBS=16\nexport DP_SHARDING={sharding}\n")
    plan = plan_from_conf("pretrain", conf, [], env)[0]
    assert plan.parallel["pipeline_parallel"] == 2
    gradients = [c for c in plan.resources["communication"]["collectives"] if c["name"] == "gradients"]
    assert [c["times"] for c in gradients] == [plan.resources["accumulation_steps"]]


def test_interleaved_pipeline_refuses_qad(env):
    """The QAD teacher runs inside a rank's one stage: interleaving is refused by name."""
    with pytest.raises(PlanError, match="PP_SCHEDULE=interleaved_1f1b with JOB=qad: the teacher is not split"):
        plan_from_conf("qad", "qwen3-8b", ["PP_SIZE=2", "PP_SCHEDULE=interleaved_1f1b", "PP_VIRTUAL_STAGES=2",
                                           "DP_SHARDING=ddp"], env, strict_paths=False)


def test_tp_with_ddp_and_tp_not_dividing_heads_are_refused(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export NUM_GPUS=8\nexport TP_SIZE=2\n")
    with pytest.raises(PlanError, match="does not compose with tensor parallelism"):
        plan_from_conf("pretrain", conf, [], env)
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export NUM_GPUS=4\nexport TP_SIZE=4\nexport DP_SHARDING=fsdp\n")
    with pytest.raises(PlanError, match="TP_SIZE=4 does not divide num_kv_heads=2 of model tiny-qwen3"):
        plan_from_conf("pretrain", conf, [], env)


def test_tp_times_pp_may_divide_several_nodes_only(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN.replace("tiny-qwen3", "llama3-1.5b") + "export NUM_GPUS=2\nexport TP_SIZE=4\n")
    with pytest.raises(PlanError, match="does not divide the 2 GPUs"):
        plan_from_conf("pretrain", conf, [], env)
    assert plan_from_conf("pretrain", conf, [], env, nnodes=2)[0].data_parallel_size == 1


def test_sizes_below_one(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export PP_SIZE=0\n")
    with pytest.raises(PlanError, match="PP_SIZE=0 must be at least 1"):
        plan_from_conf("pretrain", conf, [], env)


def test_counts_and_intervals_below_their_minimum_are_refused_naming_each(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export LOG_INTERVAL=0\nexport SAVE_INTERVAL=-1\n")
    with pytest.raises(PlanError) as error:  # LOG_INTERVAL=0 was a ZeroDivisionError after the first step
        plan_from_conf("pretrain", conf, ["training.eval_iters=0"], env)
    assert str(error.value).splitlines() == [
        f"{conf}: LOG_INTERVAL=0 (training.log_interval) must be at least 1",
        f"{conf}: EVAL_ITERS=0 (training.eval_iters) must be at least 1",
        f"{conf}: SAVE_INTERVAL=-1 (checkpoint.save_interval) must be at least 0"]
    zeros = write_conf(tmp_path, TINY_PRETRAIN + "export SAVE_INTERVAL=0\nexport EVAL_INTERVAL=0\n", "zeros.conf")
    assert plan_from_conf("pretrain", zeros, ["optim.grad_clip=0"], env)  # 0: no periodic saves, no clipping


def test_tp_shards_of_whole_nvfp4_blocks_and_a_calibrated_amax_are_checked_before_the_queue(tmp_path, env, assets):
    """A student whose down_proj input (intermediate 40) splits into TP 2 shards of 20: not whole
    blocks of 16 under nvfp4 (the workers refused it only after loading); fp8 has no blocks."""
    student = tmp_path / "student"
    student.mkdir()
    config = json.loads((assets["ckpt"] / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    conf = write_conf(tmp_path, qad_conf(student, assets["ckpt"], "export TP_SIZE=2\nexport DP_SHARDING=fsdp\n"))
    with pytest.raises(PlanError, match="TP_SIZE=2 splits the input of every down_proj \\(40\\) into shards of 20, "
                                        "not whole NVFP4 blocks of 16"):
        plan_from_conf("qad", conf, [], env)
    with pytest.raises(PlanError, match="TP_SIZE=2 with quant.calibration_batches=0"):
        plan_from_conf("qad", write_conf(tmp_path, qad_conf(assets["ckpt"], extra="export TP_SIZE=2\n"), "zero.conf"),
                       ["quant.calibration_batches=0"], env)
    assert plan_from_conf("qad", conf, ["QUANT_RECIPE=fp8"], env, strict_paths=False)  # fp8: per-tensor scales


def test_shipped_moe_conf_needs_its_four_nodes(tmp_path, env):
    env["MODELS_ROOT"] = str(tmp_path / "no-models")
    conf = "qwen3-30b-a3b-thinking-2507-moe"
    with pytest.raises(PlanError) as error:  # 8 GPUs = data-parallel 8, not divisible by EP 32
        plan_from_conf("qad", conf, [], env, strict_paths=False)
    assert "EP_SIZE=32 does not divide the data-parallel size 8" in str(error.value)
    plan, _, warnings = plan_from_conf("qad", conf, [], env, nnodes=4, strict_paths=False)
    assert plan.cluster.world_size == 32 and plan.data_parallel_size == 32
    assert plan.paths.run_name == ("Qwen3-30B-A3B-Thinking-2507-Teacher-Qwen3-30B-A3B-Thinking-2507-"
                                   "Data-combined_cot_chat-lr1e-6")
    # the 32 data-parallel ranks form one EP group of 4 experts each
    assert plan.model_facts == {"num_experts": 128, "source": "registry:qwen3-30b-a3b"}
    assert plan.parallel == {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 32,
                             "data_parallel_strategy": "fsdp", "expert_parallel": 32,
                             "expert_data_parallel": 1, "experts_per_rank": 4}
    assert not [w for w in warnings if "EP_SIZE" in w], warnings


def test_moe_conf_splits_experts_inside_pipeline_stages(tmp_path, env):
    """PP_SIZE=2 on the 4 nodes: each stage's 16 data-parallel ranks form one EP group of 8
    experts each; EP_SIZE=32 no longer divides a stage's 16 and is refused by name."""
    env["MODELS_ROOT"] = str(tmp_path / "no-models")
    conf = "qwen3-30b-a3b-thinking-2507-moe"
    plan, _, _ = plan_from_conf("qad", conf, ["PP_SIZE=2", "EP_SIZE=16", "GBS=64"], env, nnodes=4, strict_paths=False)
    assert plan.parallel == {"tensor_parallel": 1, "pipeline_parallel": 2, "data_parallel": 16,
                             "data_parallel_strategy": "fsdp", "expert_parallel": 16,
                             "expert_data_parallel": 1, "experts_per_rank": 8}
    with pytest.raises(PlanError, match=r"EP_SIZE=32 does not divide the data-parallel size 16 \(32 GPUs / TP_SIZE 1 "
                                        r"/ PP_SIZE 2\)"):
        plan_from_conf("qad", conf, ["PP_SIZE=2", "GBS=64"], env, nnodes=4, strict_paths=False)


TINY_MOE_PRETRAIN = TINY_PRETRAIN.replace("tiny-qwen3", "tiny-qwen3-moe")  # 8 experts


@pytest.mark.parametrize("launcher, extra_env", [
    ("launchers/qad.sh", {"NNODES": "4", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}),
    ("slurm/qad.sh", {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "localhost",
                      "SLURM_NODEID": "0"}),  # what `sbatch --nodes=4` gives the batch script
], ids=["nnodes", "sbatch"])
def test_shipped_moe_conf_dry_run_through_the_launchers(launcher, extra_env, tmp_path):
    env = {**cli_env(tmp_path), "MODELS_ROOT": str(tmp_path / "no-models"), "TRAIN_REPO": str(REPO), **extra_env}
    result = subprocess.run(["bash", str(REPO / launcher), "--config", "qwen3-30b-a3b-thinking-2507-moe",
                             "--dry-run"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 32 and plan["data_parallel_size"] == 32 and len(plan["node_commands"]) == 4
    assert plan["parallel"]["expert_parallel"] == 32 and plan["parallel"]["experts_per_rank"] == 4
    assert "parallel.expert_parallel_size=32" in plan["node_commands"][0]
    assert plan["resources"]["fits"] and plan["resources"]["memory_per_gpu_bytes"]["total"] < 80e9
    assert "EP_SIZE" not in result.stderr, result.stderr


def test_ep_must_divide_the_experts_of_a_registry_moe(tmp_path, env):
    conf = write_conf(tmp_path, TINY_MOE_PRETRAIN + "export NUM_GPUS=6\nexport EP_SIZE=3\n")
    with pytest.raises(PlanError, match="EP_SIZE=3 does not divide the 8 experts of model tiny-qwen3-moe"):
        plan_from_conf("pretrain", conf, [], env)


def test_ep_must_divide_the_data_parallel_size(tmp_path, env):
    conf = write_conf(tmp_path, TINY_MOE_PRETRAIN + "export NUM_GPUS=2\nexport EP_SIZE=4\n")
    with pytest.raises(PlanError, match=r"EP_SIZE=4 does not divide the data-parallel size 2 \(2 GPUs"):
        plan_from_conf("pretrain", conf, [], env)
    plan = plan_from_conf("pretrain", conf, [], env, nnodes=2)[0]  # 4 GPUs: one EP group of 4
    assert plan.parallel["experts_per_rank"] == 2 and plan.parallel["expert_data_parallel"] == 1


def test_ep_on_a_moe_plans_with_the_expert_layout(tmp_path, env):
    conf = write_conf(tmp_path, TINY_MOE_PRETRAIN + "export NUM_GPUS=8\nexport EP_SIZE=2\n")
    plan, _, warnings = plan_from_conf("pretrain", conf, [], env)
    assert plan.parallel == {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 8,
                             "data_parallel_strategy": "ddp", "expert_parallel": 2,
                             "expert_data_parallel": 4, "experts_per_rank": 4}
    assert warnings == []


def test_ep_keeps_the_other_parallel_checks(tmp_path, env):
    """EP > 1 once skipped the strategy checks: TP with DDP must still be refused."""
    conf = write_conf(tmp_path, TINY_MOE_PRETRAIN + "export NUM_GPUS=8\nexport TP_SIZE=2\nexport EP_SIZE=2\n")
    with pytest.raises(PlanError, match="does not compose with tensor parallelism"):
        plan_from_conf("pretrain", conf, [], env)


def test_ep_with_zero1_is_planned_by_a_dry_run_and_refused_by_a_real_start(tmp_path, env):
    conf = write_conf(tmp_path, TINY_MOE_PRETRAIN + "export NUM_GPUS=4\nexport EP_SIZE=2\nexport DP_SHARDING=zero1\n")
    plan, _, warnings = plan_from_conf("pretrain", conf, [], env, strict_paths=False)
    assert plan.parallel["expert_parallel"] == 2 and any("EP_SIZE=2 with parallel.data_parallel='zero1'" in w
                                                         for w in warnings), warnings
    with pytest.raises(PlanError, match=f"{conf}: EP_SIZE=2 with parallel.data_parallel='zero1'"):
        plan_from_conf("pretrain", conf, [], env)


def test_tp_with_ep_plans(tmp_path, env):
    conf = write_conf(tmp_path, TINY_MOE_PRETRAIN + "export NUM_GPUS=4\nexport TP_SIZE=2\nexport EP_SIZE=2\n"
                                                   "export DP_SHARDING=fsdp\n")
    plan, _, warnings = plan_from_conf("pretrain", conf, [], env)
    assert plan.parallel["expert_parallel"] == 2 and plan.parallel["data_parallel"] == 2 and warnings == []


def test_ep_on_a_dense_registry_model(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export EP_SIZE=2\n")
    with pytest.raises(PlanError) as error:
        plan_from_conf("pretrain", conf, [], env)
    assert conf in str(error.value) and "EP_SIZE=2" in str(error.value) and "dense" in str(error.value)


def test_ep_on_a_dense_hf_checkpoint(tmp_path, env, assets):
    conf = write_conf(tmp_path, qad_conf(assets["ckpt"], extra="export EP_SIZE=2\nexport DATASET_NAME=synthetic\n"))
    with pytest.raises(PlanError, match="EP_SIZE=2 but model tiny-qwen3 is dense"):
        plan_from_conf("qad", conf, [], env)


@pytest.mark.parametrize("field", ["num_experts", "num_local_experts"])
def test_ep_against_the_experts_in_config_json(field, tmp_path, env):
    moe = tmp_path / "moe"
    moe.mkdir()
    shape = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 96, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    (moe / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", field: 6, **shape}))
    extra = "export NUM_GPUS=8\nexport DATASET_NAME=synthetic\n"
    with pytest.raises(PlanError, match="EP_SIZE=4 does not divide the 6 experts"):
        plan_from_conf("qad", write_conf(tmp_path, qad_conf(moe, extra=extra + "export EP_SIZE=4\n")), [], env)
    plan = plan_from_conf("qad", write_conf(tmp_path, qad_conf(moe, extra=extra + "export EP_SIZE=2\n")), [], env)[0]
    assert plan.model_facts == {"num_experts": 6, "source": str(moe / "config.json")}
    assert plan.data_parallel_size == 8


# ----------------------------------------------------------------- batch sizes and length

def test_gbs_must_be_a_multiple_of_mbs_times_dp(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export GBS=6\n")
    with pytest.raises(PlanError) as error:
        plan_from_conf("pretrain", conf, [], env)
    assert conf in str(error.value) and "GBS=6" in str(error.value) and "2 x 2" in str(error.value)


@pytest.mark.parametrize("name,value", [
    ("NUM_GPUS", "0"),
    ("MBS", "0"),
    ("NUM_GPUS", "-2"),
    ("TP_SIZE", "-1"),
])
def test_sizes_must_be_positive(name, value, tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + f"export {name}={value}\n")
    with pytest.raises((PlanError, ConfError)) as error:
        plan_from_conf("pretrain", conf, [], env, strict_paths=False)
    assert conf in str(error.value) and name in str(error.value)


def test_gbs_default_and_explicit(tmp_path, env):
    assert plan_from_conf("pretrain", write_conf(tmp_path, TINY_PRETRAIN), [], env)[0].global_batch_size == 4
    plan = plan_from_conf("pretrain", write_conf(tmp_path, TINY_PRETRAIN + "export GBS=12\n"), [], env)[0]
    assert plan.global_batch_size == 12


def test_unknown_model_lists_the_known_ones(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export MODEL=no-such-model\n")
    with pytest.raises(PlanError) as error:
        plan_from_conf("pretrain", conf, [], env)
    message = str(error.value)
    assert conf in message and "MODEL" in message and "no-such-model" in message
    assert "tiny-qwen3" in message and "qwen3-8b" in message and "llama3-1.5b" in message


def test_train_samples_default_is_one_epoch_of_the_blend(tmp_path, env, assets):
    env["DATACACHE_DIR"] = str(assets["data"])
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export DATASET_NAME=mix\n")
    plan = plan_from_conf("pretrain", conf, [], env)[0]
    blend = str(assets["data"] / "datablend_mix.json")
    expected = tokens_on_disk(assets["a"]) // SEQ + tokens_on_disk(assets["b"]) // SEQ  # weights do not enter
    assert plan.blend_path == blend
    assert plan.train_samples == expected == train_samples_for_blend(blend, SEQ)
    assert plan.train_samples > 20
    assert plan.train_iters == expected // plan.global_batch_size
    # the sequence length of the conf is the one used
    shorter = plan_from_conf("pretrain", write_conf(tmp_path, TINY_PRETRAIN + "export DATASET_NAME=mix\n"
                                                    "export SEQ_LENGTH=32\n"), [], env)[0]
    assert shorter.train_samples == tokens_on_disk(assets["a"]) // 32 + tokens_on_disk(assets["b"]) // 32


def test_train_samples_and_iters_from_the_conf_win(tmp_path, env, assets):
    env["DATACACHE_DIR"] = str(assets["data"])
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export DATASET_NAME=one\nexport TRAIN_SAMPLES=10\n")
    plan = plan_from_conf("pretrain", conf, [], env)[0]
    assert (plan.train_samples, plan.train_iters) == (10, 2)  # 10 // GBS 4
    plan = plan_from_conf("pretrain", conf, ["training.train_iters=7"], env)[0]
    assert plan.train_iters == 7


def test_blend_path_overrides_dataset_name(tmp_path, env, assets):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export DATASET_NAME=whatever\n"
                      f"export BLEND_PATH={assets['data'] / 'datablend_one.json'}\n")
    plan = plan_from_conf("pretrain", conf, [], env)[0]
    assert plan.blend_path == str(assets["data"] / "datablend_one.json")
    assert plan.train_samples == tokens_on_disk(assets["a"]) // SEQ
    assert plan.paths.run_name == "tiny-qwen3-pretrain-Data-whatever-lr0.0003"


def test_too_few_samples_for_one_batch(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export TRAIN_SAMPLES=3\n")
    with pytest.raises(PlanError, match="TRAIN_SAMPLES=3 gives no full global batch of 4"):
        plan_from_conf("pretrain", conf, [], env)


def test_synthetic_data_needs_no_blend(tmp_path, env):
    plan = plan_from_conf("pretrain", write_conf(tmp_path, TINY_PRETRAIN + "export TRAIN_ITERS=5\n"), [], env)[0]
    assert plan.blend_path is None and plan.path_problems == [] and plan.train_iters == 5


# ----------------------------------------------------------------- paths

def test_every_missing_path_is_reported_at_once(tmp_path, env):
    conf = write_conf(tmp_path, qad_conf(tmp_path / "no-student", tmp_path / "no-teacher",
                                         f"export DATASET_NAME=absent\nexport KD_CFG_PATH={tmp_path}/kd.yaml\n"))
    with pytest.raises(PlanError) as error:
        plan_from_conf("qad", conf, [], env)
    lines = str(error.value).splitlines()
    assert len(lines) == 4 and all(line.startswith(conf) for line in lines)
    text = str(error.value)
    assert "STUDENT_CKPT" in text and str(tmp_path / "no-student") in text
    assert "TEACHER_CKPT" in text and str(tmp_path / "no-teacher") in text
    assert "KD_CFG_PATH" in text and f"{tmp_path}/kd.yaml" in text
    assert "BLEND_PATH" in text and str(Path(env["DATACACHE_DIR"]) / "datablend_absent.json") in text


def test_dry_run_lists_path_problems_instead_of_raising(tmp_path, env):
    conf = write_conf(tmp_path, qad_conf(tmp_path / "no-student", tmp_path / "no-teacher",
                                         "export DATASET_NAME=absent\n"))
    plan = plan_from_conf("qad", conf, [], env, strict_paths=False)[0]
    assert len(plan.path_problems) == 3
    assert [p for p in plan.path_problems if "STUDENT_CKPT" in p and "no-student" in p]
    assert [p for p in plan.path_problems if "TEACHER_CKPT" in p and "no-teacher" in p]
    assert [p for p in plan.path_problems if "datablend_absent.json" in p]
    assert plan.train_samples is None and plan.train_iters is None
    assert plan.as_dict()["path_problems"] == plan.path_problems
    assert not (tmp_path / "runs").exists()  # planning creates nothing


def test_blend_with_a_missing_prefix_is_a_path_problem(tmp_path, env, assets):
    env["DATACACHE_DIR"] = str(assets["data"])
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export DATASET_NAME=broken\n")
    with pytest.raises(PlanError) as error:
        plan_from_conf("pretrain", conf, [], env)
    assert "BLEND_PATH" in str(error.value) and "missing_document" in str(error.value)


# ----------------------------------------------------------------- a whole QAD plan

def test_qad_plan_with_real_checkpoints_and_blend(tmp_path, env, assets):
    env.update(MODELS_ROOT=str(assets["models"]), DATACACHE_DIR=str(assets["data"]), DATASET_NAME="mix")
    plan, overrides, warnings = plan_from_conf("qad", "tiny-qwen3-qad", [], env)
    assert warnings == [] and plan.path_problems == []
    assert plan.paths.run_dir == tmp_path / "runs" / "tiny-qwen3-Teacher-tiny-qwen3-Data-mix-lr0.0001"
    assert plan.paths.checkpoints == plan.paths.run_dir / "checkpoints" / "tiny-qwen3"
    assert (plan.resume.decision, plan.resume.path) == ("from_checkpoint", str(assets["ckpt"]))
    assert plan.model_facts == {"num_experts": 0, "source": str(assets["ckpt"] / "config.json")}
    assert plan.train_samples == train_samples_for_blend(str(assets["data"] / "datablend_mix.json"), 64)
    assert plan.train_iters == 10  # TRAIN_ITERS=${TRAIN_ITERS:-10} in the conf
    assert f"model.hf_checkpoint={assets['ckpt']}" in overrides and "data.source=blend" in overrides
    assert plan.conf == str(REPO / "conf.d" / "tiny-qwen3-qad.conf")


def test_lr_default_reaches_the_qad_run_name(tmp_path, env, assets):
    conf = write_conf(tmp_path, qad_conf(assets["ckpt"], extra="export DATASET_NAME=synthetic\n"))
    plan = plan_from_conf("qad", conf, [], env)[0]
    assert plan.paths.run_name == "tiny-qwen3-Teacher-tiny-qwen3-Data-synthetic-lr1e-6"


def test_shipped_qwen3_8b_conf(tmp_path, env):
    env["MODELS_ROOT"] = str(tmp_path / "models")
    plan = plan_from_conf("qad", "qwen3-8b", [], env, strict_paths=False)[0]
    assert plan.paths.run_name == "Qwen3-8B-Teacher-Qwen3-8B-Data-combined_v2_cot_chat-lr1e-6"
    assert plan.cluster.world_size == 8 and plan.data_parallel_size == 8 and plan.global_batch_size == 32
    assert plan.model_facts == {"num_experts": 0, "source": "registry:qwen3-8b"}
    assert len(plan.path_problems) == 3


def test_existing_tracker_resumes(tmp_path, env, assets):
    conf = write_conf(tmp_path, qad_conf(assets["ckpt"], extra="export DATASET_NAME=synthetic\n"))
    first = plan_from_conf("qad", conf, [], env)[0]
    (first.paths.checkpoints / "iter_0000005").mkdir(parents=True)
    for name in (".metadata", "trainer.pt"):  # an older checkpoint without manifest
        (first.paths.checkpoints / "iter_0000005" / name).write_bytes(b"x")
    (first.paths.checkpoints / TRACKER_FILE).write_text("5\n")
    plan = plan_from_conf("qad", conf, [], env)[0]
    assert (plan.resume.decision, plan.resume.iteration) == ("resume", 5)
    (first.paths.checkpoints / TRACKER_FILE).write_text("9\n")
    plan, _, warnings = plan_from_conf("qad", conf, [], env)
    assert plan.resume.iteration == 5  # the newest intact checkpoint, with one warning naming iter_0000009
    assert [w for w in warnings if "skipping damaged checkpoint" in w and "iter_0000009" in w]
    (first.paths.checkpoints / "iter_0000005" / ".metadata").unlink()
    with pytest.raises(PlanError) as error:
        plan_from_conf("qad", conf, [], env)
    assert conf in str(error.value) and "iteration 9" in str(error.value)


def test_finetune_starts_from_the_base_checkpoint(env, assets):
    env["MODELS_ROOT"] = str(assets["models"])
    plan = plan_from_conf("finetune", "tiny-qwen3-lora", [], env)[0]
    assert (plan.resume.decision, plan.resume.path) == ("from_checkpoint", str(assets["ckpt"]))
    assert plan.paths.run_name == "tiny-qwen3-finetune-Data-synthetic-lr0.001"


# ----------------------------------------------------------------- cluster and node commands

def test_one_node_command_per_node(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export TRAIN_ITERS=20\n")
    plan, overrides, _ = plan_from_conf("pretrain", conf, ["training.train_iters=3"], env, nnodes=4)
    assert plan.cluster.nnodes == 4 and plan.cluster.world_size == 8 and plan.train_iters == 3
    commands = plan.node_commands
    assert len(commands) == 4
    for rank, command in enumerate(commands):
        assert command[:4] == ["torchrun", "--nnodes=4", f"--node-rank={rank}", "--nproc-per-node=2"]
        assert command[command.index("-m") + 1] == "train.pretrain"
        assert command[command.index("-m") + 2:] == overrides
        assert [c for i, c in enumerate(command) if i != 2] == [c for i, c in enumerate(commands[0]) if i != 2]
    # the user's override comes after the conf's, so it wins in Hydra
    assert overrides.index("training.train_iters=3") > overrides.index("training.train_iters=20")


def test_node_command():
    cluster = ClusterEnv("manual", 2, 1, "10.0.0.1", 29500, 8, None)
    assert node_command("qad", cluster, 1, ["a=1", "b='x y'"]) == [
        "torchrun", "--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--rdzv-backend=static",
        "--rdzv-endpoint=10.0.0.1:29500", "--max-restarts=0", "-m", "train.qad", "a=1", "b='x y'"]


def test_slurm_plan_uses_the_job_for_port_and_log_names(tmp_path, env, no_scontrol):
    env.update(SLURM_JOB_ID="31337", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_NODEID="0",
               SLURM_JOB_ACCOUNT="acct", SLURM_JOB_NAME="pre")
    plan = plan_from_conf("pretrain", write_conf(tmp_path, TINY_PRETRAIN), [], env)[0]
    assert plan.cluster.mode == "slurm" and plan.cluster.master_port == 31337
    assert plan.cluster.master_addr == "localhost"
    assert plan.paths.slurm_log == tmp_path / "runs" / "logs_slurm" / f"acct-pre_31337_{STAMP}.log"
    assert "--rdzv-endpoint=localhost:31337" in plan.node_commands[0]


def test_manual_multi_node_from_the_environment(tmp_path, env):
    env.update(NNODES="3", NODE_RANK="2", MASTER_ADDR="10.0.0.7", MASTER_PORT="29400")
    plan = plan_from_conf("pretrain", write_conf(tmp_path, TINY_PRETRAIN), [], env)[0]
    assert (plan.cluster.mode, plan.cluster.nnodes, plan.cluster.node_rank) == ("manual", 3, 2)
    assert plan.data_parallel_size == 6 and len(plan.node_commands) == 3


# ----------------------------------------------------------------- Hydra overrides

def value_for(var):
    return {"int": 3, "float": 0.25, "bool": True}.get(var.kind, "/data/my runs/it's=x,y")


@pytest.mark.parametrize("job", ["qad", "pretrain", "finetune"])
def test_every_conf_value_reaches_its_config_key(job):
    values = {name: value_for(var) for name, var in CONF_VARIABLES.items() if job in var.jobs and var.key}
    values["DATASET_NAME"] = "openscience"
    cfg = compose_config(job, conf_hydra_overrides(job, values))
    for key, value in config_overrides(job, values).items():
        assert OmegaConf.select(cfg, key) == value, key


@pytest.mark.parametrize("value", ["plain", "/a b/c", "it's", "a=b", "x,y", "true", "null", "8", "1e-3",
                                   "${oc.env:HOME}", "[1]", "", "Qwen3-8B", "100 200-205", 'say "hi"'])
def test_hydra_value_round_trips_strings(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override("k=" + hydra_value(value)).value() == value


def test_hydra_value_keeps_backslashes():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override("k=" + hydra_value("/data/a\\b")).value() == "/data/a\\b"


def test_hydra_value_types():
    assert hydra_value(True) == "true" and hydra_value(False) == "false"
    assert hydra_value(3) == "3" and float(hydra_value(1e-6)) == 1e-6


# ----------------------------------------------------------------- shell output

def test_shell_exports_survive_eval(tmp_path, env):
    root = tmp_path / "run's dir $(touch pwned) `touch pwned2`"
    env["QAD_CHECKPOINT_ROOT"] = str(root)
    plan, overrides, _ = plan_from_conf("pretrain", "tiny-qwen3", [], env)
    assert plan.paths.root == root
    script = (shell_exports(plan, overrides) +
              '\nprintf "%s\\0" "$RUN_DIR" "$RUN_NAME" "$CHECKPOINT_ROOT" "$SLURM_LOG" "$NNODES" "$NUM_GPUS"'
              ' "$MASTER_PORT" "$RUN_DATETIME" "$RESUME_DECISION" "$RESUME_ITERATION" "${TRAIN_OVERRIDES[@]}"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    fields = result.stdout.split("\0")[:-1]
    assert fields[:10] == [str(plan.paths.run_dir), plan.paths.run_name, str(root), str(plan.paths.slurm_log),
                           "1", "2", str(plan.cluster.master_port), STAMP, "from_scratch", "0"]
    assert fields[10:] == overrides
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


# ----------------------------------------------------------------- CLI

def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items()}  # already cleaned by clean_os_env
    env.update(QAD_CHECKPOINT_ROOT=str(tmp_path / "runs"), DATACACHE_DIR=str(tmp_path / "data"),
               RUN_DATETIME=STAMP)
    return env


def run_cli(args, env, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "train.launch.plan", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_cli_bad_conf_exits_2_with_one_error_line(tmp_path):
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export MBS=two\n")
    result = run_cli(["--job", "pretrain", "--config", conf, "--dry-run"], cli_env(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert conf in result.stderr and "MBS='two'" in result.stderr


def test_cli_prints_the_plan_as_json_with_one_command_per_node(tmp_path):
    result = run_cli(["--job", "pretrain", "--config", "tiny-qwen3", "--dry-run", "--nodes", "4", "--",
                      "training.train_iters=3"], cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 8 and plan["train_iters"] == 3
    assert plan["run_dir"] == str(tmp_path / "runs" / "tiny-qwen3-pretrain-Data-synthetic-lr0.001")
    commands = plan["node_commands"]
    assert len(commands) == 4
    for rank, command in enumerate(commands):
        words = shlex.split(command)
        assert words[:3] == ["torchrun", "--nnodes=4", f"--node-rank={rank}"]
        assert words[-1] == "training.train_iters=3"
    assert not (tmp_path / "runs").exists()


def test_cli_format_shell_can_be_evaled(tmp_path):
    script = (f'eval "$({shlex.quote(sys.executable)} -m train.launch.plan --job pretrain --config tiny-qwen3 '
              '--format shell -- training.train_iters=3)" || exit 9\n'
              'printf "%s\\n" "$RUN_DIR" "$ENV_LOG" "$NNODES" "${TRAIN_OVERRIDES[-1]}"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=cli_env(tmp_path),
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    run_dir = str(tmp_path / "runs" / "tiny-qwen3-pretrain-Data-synthetic-lr0.001")
    assert result.stdout.splitlines() == [run_dir, f"{run_dir}/logs/tiny-qwen3_{STAMP}.env.log", "1",
                                          "training.train_iters=3"]


def test_main_unknown_config(capsys):
    assert main(["--job", "qad", "--config", "no-such-conf-xyz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config no-such-conf-xyz") and "known:" in err and "qwen3-8b" in err


def test_main_warns_on_typos_and_dry_run_path_problems(tmp_path, monkeypatch, capsys):
    for key, value in cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    conf = write_conf(tmp_path, TINY_PRETRAIN + "export TP_SZE=1\nexport DATASET_NAME=absent\n")
    assert main(["--job", "pretrain", "--config", conf, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {conf}: TP_SZE: did you mean TP_SIZE?" in err.splitlines()
    assert any(line.startswith("warning: ") and "datablend_absent.json" in line for line in err.splitlines())
    printed = json.loads(out)
    assert printed["path_problems"] and len(printed["node_commands"]) == 1
    assert printed["node_commands"][0].startswith("torchrun --nnodes=1 --node-rank=0 --nproc-per-node=2 ")
    # without --dry-run the same missing blend is an error
    assert main(["--job", "pretrain", "--config", conf]) == 2
    assert "error: " in capsys.readouterr().err


def test_main_cluster_error_exits_2(tmp_path, monkeypatch, capsys):
    for key, value in cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "5")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert main(["--job", "pretrain", "--config", write_conf(tmp_path, TINY_PRETRAIN)]) == 2
    assert "NODE_RANK=5" in capsys.readouterr().err


def test_main_conf_error_is_a_conf_error():
    with pytest.raises(ConfError):  # the plan's own callers get the typed error
        plan_from_conf("pretrain", "no-such-conf-xyz", [], {})


@pytest.mark.parametrize("extra", ["export DATASET_NAME=validonly\n", "export DATASET_NAME=one\nexport SEQ_LENGTH=0\n"])
def test_main_blend_problems_found_while_counting_samples_exit_2(extra, tmp_path, monkeypatch, capsys, assets):
    for key, value in cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DATACACHE_DIR", str(assets["data"]))
    conf = write_conf(tmp_path, TINY_PRETRAIN + extra)
    assert main(["--job", "pretrain", "--config", conf, "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ----------------------------------------------------------------- master weights

@pytest.mark.parametrize("lr, param_dtype, warned", [("1e-6", "bfloat16", True), ("1e-4", "bfloat16", False),
                                                      ("1e-6", "float32", False)])
def test_bf16_parameters_with_an_lr_bf16_rounds_away_warn(tmp_path, env, lr, param_dtype, warned):
    conf = write_conf(tmp_path, TINY_PRETRAIN + f"export LR={lr}\n")
    _, _, warnings = plan_from_conf("pretrain", conf, [f"model.param_dtype={param_dtype}"], env)
    messages = [w for w in warnings if "param_dtype" in w]
    assert bool(messages) == warned, warnings
    if warned:
        assert conf in messages[0] and "LR 1e-06" in messages[0] and "6.1e-05" in messages[0]


# ----------------------------------------------------------------- the plan file (workers read it)

TOKEN = "hf_FAKE_plan_file_test_value"
HANDOFF_CONF = (TINY_PRETRAIN + "export NCCL_DEBUG='INFO warn'\nunset DROPPED_BY_CONF\n"
                f"export HF_TOKEN={TOKEN}\n")


@pytest.fixture
def conf(tmp_path) -> str:
    path = tmp_path / "handoff.conf"
    path.write_text(HANDOFF_CONF)
    return str(path)


def test_plan_json_round_trip(conf, env):
    plan, _, _ = plan_from_conf("pretrain", conf, ["training.train_iters=3"], env)
    again = JobPlan.from_json(plan.to_json())
    assert again == plan
    assert isinstance(again.paths, RunPaths) and isinstance(again.paths.checkpoints, Path)
    assert again.paths.plan_file == plan.paths.run_dir / "plans" / f"plan_{STAMP}_nojob.json"
    assert again.cluster.world_size == 2 and again.train_iters == 3
    assert TOKEN not in plan.to_json()  # the conf's environment (HF_TOKEN) never reaches the file


def test_worker_config_matches_the_plan_fingerprint_and_a_different_one_does_not(conf, env):
    plan, overrides, _ = plan_from_conf("pretrain", conf, ["training.train_iters=3"], env)
    worker_cfg = compose_config("pretrain", overrides)  # what torchrun's workers compose
    assert config_fingerprint(worker_cfg) == plan.config_fingerprint
    assert config_fingerprint(compose_config("pretrain", [*overrides, "optim.lr=0.5"])) != plan.config_fingerprint


def write_plan_json(tmp_path, plan: JobPlan) -> str:
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return str(path)


@pytest.mark.parametrize("job,extra,world,expected", [
    ("pretrain", ["training.train_iters=4"], 2, "planned for config"),
    ("pretrain", [], 4, "torchrun started 4 processes, the plan has 1 node(s) x 2 = 2"),
    ("finetune", [], 2, "a plan for a pretrain job, this is finetune"),
])
def test_a_plan_for_another_job_is_refused_with_one_error_line(job, extra, world, expected, tmp_path, conf, env,
                                                               capsys):
    plan, overrides, _ = plan_from_conf("pretrain", conf, ["training.train_iters=3"], env)
    path = write_plan_json(tmp_path, plan)
    with pytest.raises(SystemExit) as exit_info:
        read_plan_file(path, job, compose_config("pretrain", overrides + extra), world)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: TRAIN_PLAN_FILE={path}: ") and expected in lines[0]
    assert read_plan_file(path, "pretrain", compose_config("pretrain", overrides), 2) == plan


def test_rank0_sees_a_checkpoint_saved_after_the_plan(tmp_path, conf, env):
    plan, overrides, _ = plan_from_conf("pretrain", conf, [], env)
    assert plan.resume.decision == "from_scratch"
    saved = plan.paths.checkpoints / "iter_0000006"
    saved.mkdir(parents=True)
    for name in (".metadata", "trainer.pt", "__0_0.distcp"):  # what an intact checkpoint holds
        (saved / name).write_bytes(b"x")
    (plan.paths.checkpoints / TRACKER_FILE).write_text("6\n")
    now = current_resume(plan, compose_config("pretrain", overrides))
    assert (now.resume.decision, now.resume.iteration) == ("resume", 6)
    assert now.paths == plan.paths and now.config_fingerprint == plan.config_fingerprint


def test_a_planning_error_on_rank0_exits_2(capsys):
    def broken():
        raise PlanError("test.conf: GBS=3 is not a multiple of MBS x data-parallel size = 2 x 2")

    with pytest.raises(SystemExit) as exit_info:
        plan_from_rank0(broken)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: test.conf: GBS=3 is not a multiple of MBS x data-parallel size = 2 x 2\n"


def test_launcher_shell_output_writes_the_plan_and_exports_the_conf_as_sourcing_would(tmp_path, conf, env):
    """What lib.sh evals instead of sourcing the conf a second time: the same exported environment."""
    environment = {**os.environ, **env, "DROPPED_BY_CONF": "x"}
    plan_cmd = (f'eval "$({shlex.quote(sys.executable)} -m train.launch.plan --job pretrain --config {conf} '
                '--format shell --write-plan)" || exit 9')
    sourced = f'set -a +u; source {conf}; set +a -u'
    dump = 'printf "%s\\n" "$TRAIN_PLAN_FILE" >&2; env -0 | sort -z'
    planned = subprocess.run(["bash", "-c", f"{plan_cmd}\n{dump}"], capture_output=True, text=True,
                             env=environment, cwd=REPO, timeout=120)
    assert planned.returncode == 0, planned.stderr
    plan_file = Path(planned.stderr.splitlines()[-1])
    assert plan_file == tmp_path / "runs" / "tiny-qwen3-pretrain-Data-synthetic-lr0.0003" / "plans" / f"plan_{STAMP}_nojob.json"
    assert json.loads(plan_file.read_text())["resume"]["decision"] == "from_scratch"
    assert TOKEN not in plan_file.read_text()
    reference = subprocess.run(["bash", "-c", f"{sourced}\nenv -0 | sort -z"], capture_output=True, text=True,
                               env=environment, cwd=REPO, timeout=60)

    def conf_part(dump_text: str) -> dict[str, str]:
        names = {"MODEL", "DATASET_NAME", "SEQ_LENGTH", "MBS", "NUM_GPUS", "NCCL_DEBUG", "HF_TOKEN", "DROPPED_BY_CONF"}
        pairs = (item.split("=", 1) for item in dump_text.split("\0") if "=" in item)
        return {k: v for k, v in pairs if k in names}

    assert conf_part(planned.stdout) == conf_part(reference.stdout)
    assert conf_part(planned.stdout)["NCCL_DEBUG"] == "INFO warn" and "DROPPED_BY_CONF" not in conf_part(planned.stdout)


def test_a_dry_run_with_a_missing_kd_file_still_plans(tmp_path, env):
    conf = tmp_path / "qad.conf"
    conf.write_text(f"export STUDENT_MODEL=tiny-qwen3\nexport TEACHER_MODEL=tiny-qwen3\nexport STUDENT_CKPT={tmp_path}/s\n"
                    f"export TEACHER_CKPT={tmp_path}/t\nexport TP_SIZE=1\nexport MBS=2\nexport NUM_GPUS=2\n"
                    f"export DATASET_NAME=synthetic\nexport KD_CFG_PATH={tmp_path}/kd.yaml\n")
    plan = plan_from_conf("qad", str(conf), [], env, strict_paths=False)[0]
    assert any("KD_CFG_PATH" in problem for problem in plan.path_problems) and plan.config_fingerprint


def test_qad_fingerprint_holds_after_the_entrypoint_merges_kd_cfg_path(tmp_path, env):
    """train/qad.py merges KD_CFG_PATH into cfg.distill before start_job; the plan's fingerprint counts it."""
    from train.distill.kd_config import apply_kd_config

    kd = tmp_path / "kd.yaml"
    kd.write_text("logit_kl_temperature: 2\nskip_lm_loss: true\n")
    conf = write_conf(tmp_path, qad_conf(tmp_path / "s", extra=f"export DATASET_NAME=synthetic\nexport KD_CFG_PATH={kd}\n"))
    plan, overrides, _ = plan_from_conf("qad", conf, [], env, strict_paths=False)
    worker_cfg = compose_config("qad", overrides)
    apply_kd_config(worker_cfg.distill)
    assert worker_cfg.distill.temperature == 2 and worker_cfg.distill.lm_loss_weight == 0
    assert config_fingerprint(worker_cfg) == plan.config_fingerprint
    kd.write_text("logit_kl_temperature: 3\n")  # a KD file changed after the plan: another config
    assert config_fingerprint(worker_cfg) != plan.config_fingerprint


# ----------------------------------------------------------------- one spelling per setting; the conf's job

@pytest.mark.parametrize("job,override,spelling", [
    ("pretrain", "parallel=fsdp", "write parallel.data_parallel=fsdp (or DP_SHARDING=fsdp in the conf)"),
    ("qad", "quant=fp8", "write quant.recipe=fp8 (or QUANT_RECIPE=fp8 in the conf)"),
    ("finetune", "quant=nvfp4", "write lora.quantized_base=nvfp4 (or QUANT_RECIPE=nvfp4 in the conf)"),
    ("pretrain", "model=tiny-llama3", "write model.name=tiny-llama3 (or MODEL=tiny-llama3 in the conf)"),
])
def test_former_group_overrides_are_one_error_line_with_the_key_to_write(job, override, spelling, tmp_path,
                                                                          monkeypatch, capsys):
    for key, value in cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    text = {"pretrain": TINY_PRETRAIN, "qad": qad_conf(tmp_path / "absent"),
            "finetune": TINY_PRETRAIN + f"export BASE_CKPT={tmp_path / 'absent'}\n"}[job]
    conf = write_conf(tmp_path, text)
    assert main(["--job", job, "--config", conf, "--dry-run", "--", "training.train_iters=3", override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"error: {conf}: override {override}: there is no "
                                              f"{override.split('=')[0]}/ config group; {spelling}"]


def test_the_spelling_the_refusal_names_composes(tmp_path, env):
    conf = write_conf(tmp_path, TINY_PRETRAIN)
    plan, overrides, _ = plan_from_conf("pretrain", conf, ["parallel.data_parallel=fsdp", "model.name=tiny-llama3"],
                                        env, strict_paths=False)
    assert plan.parallel["data_parallel_strategy"] == "fsdp" and plan.paths.run_name.startswith("tiny-llama3-")
    dp_sharding = write_conf(tmp_path, TINY_PRETRAIN + "export DP_SHARDING=fsdp\n", "fsdp.conf")
    assert plan_from_conf("pretrain", dp_sharding, [], env)[0].parallel["data_parallel_strategy"] == "fsdp"


@pytest.mark.parametrize("launcher,args,message", [
    ("qad", ["--config", "conf.d/tiny-qwen3.conf"],
     "JOB=pretrain: this conf is for a pretrain job, not qad (launchers/pretrain.sh, slurm/pretrain.sh)"),
    ("pretrain", ["--config", "tiny-qwen3", "--", "parallel=fsdp"],
     "override parallel=fsdp: there is no parallel/ config group; "
     "write parallel.data_parallel=fsdp (or DP_SHARDING=fsdp in the conf)"),
])
def test_launchers_refuse_at_plan_time_with_one_line(launcher, args, message, tmp_path):
    result = subprocess.run(["bash", str(REPO / "launchers" / f"{launcher}.sh"), *args], capture_output=True,
                            text=True, env=cli_env(tmp_path), cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {REPO / 'conf.d/tiny-qwen3.conf'}: {message}"]
    assert not (tmp_path / "runs").exists()


def test_pipeline_parallelism_plans_qad_and_refuses_what_it_cannot_split(env):
    """QAD splits the teacher into the student's stages (train/parallel/pipeline.py); a teacher
    with fewer layers than stages, and fine-tuning's validate mode, are refused."""
    plan = plan_from_conf("qad", "qwen3-8b", ["PP_SIZE=2"], env, strict_paths=False)[0]
    assert plan.parallel["pipeline_parallel"] == 2 and plan.data_parallel_size == 4
    with pytest.raises(PlanError, match="TEACHER_MODEL=tiny-qwen3: PP_SIZE=8 exceeds the model's 4 layers"):
        plan_from_conf("qad", "qwen3-8b", ["PP_SIZE=8", "TEACHER_MODEL=tiny-qwen3"], env, strict_paths=False)
    lora = plan_from_conf("finetune", "qwen3-8b-lora", ["PP_SIZE=2", "GBS=32"], env, strict_paths=False)[0]
    assert lora.parallel["pipeline_parallel"] == 2  # LoRA training runs on stages; its generation does not
    with pytest.raises(PlanError, match="PP_SIZE=2 with mode=validate: generation does not run on pipeline stages"):
        plan_from_conf("finetune", "qwen3-8b-lora", ["PP_SIZE=2", "GBS=32", "mode=validate"], env, strict_paths=False)
