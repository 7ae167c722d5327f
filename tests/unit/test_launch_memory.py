"""python -m pytest tests/unit/test_launch_memory.py  (the memory and time plan: figures, refusals, DP_SHARDING=auto)

The arithmetic is checked against a measured step in tests/integration/test_memory_plan.py;
here: what the plan says about the shipped confs at their real sizes, and what it refuses.
"""

import json
import math
import os
import re
from pathlib import Path

import pytest

from train.launch.conf import CONF_VARIABLES
from train.launch.comms import parameter_groups
from train.launch.memory import (OVERHEAD_BYTES, Split, memory_breakdown, parse_slurm_time, pipeline_stages,
                                 resource_summary)
from train.launch.plan import PlanError, main, plan_from_conf
from train.models.registry import get_model_args

# pretraining Qwen3-8B on one node of 8 GPUs: no checkpoint or data files needed
BIG = ("export MODEL=qwen3-8b\nexport DATASET_NAME=synthetic\nexport SEQ_LENGTH=4096\nexport MBS=4\n"
       "export NUM_GPUS=8\nexport TRAIN_ITERS=1000\n")


@pytest.fixture(autouse=True)
def clean_os_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in CONF_VARIABLES or name in ("RUN_DATETIME", "SBATCH_TIMELIMIT"):
            monkeypatch.delenv(name)


@pytest.fixture
def env(tmp_path):
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "QAD_CHECKPOINT_ROOT": str(tmp_path / "runs"), "DATACACHE_DIR": str(tmp_path / "data")}


def conf(tmp_path, text: str) -> str:
    path = tmp_path / "big.conf"
    path.write_text(text)
    return str(path)


def test_ddp_student_of_8b_holds_131_gb_of_weights_gradients_and_adamw(tmp_path):
    args = get_model_args("qwen3-8b")
    memory = memory_breakdown(args, job="qad", layout=Split(1, 1, 8, "ddp"), mbs=1, seq_length=4096,
                              param_bytes=4, act_bytes=2, checkpointing=True)
    student = memory["parameters"] + memory["gradients"] + memory["optimizer"]
    assert 128e9 < student < 134e9  # 8.2B x (4 + 4 + 8) bytes
    fsdp = memory_breakdown(args, job="qad", layout=Split(1, 1, 8, "fsdp"), mbs=1, seq_length=4096,
                            param_bytes=4, act_bytes=2, checkpointing=True)
    assert fsdp["parameters"] == pytest.approx(memory["parameters"] / 8)
    assert fsdp["optimizer"] == pytest.approx(memory["optimizer"] / 8)
    bf16 = memory_breakdown(args, job="qad", layout=Split(1, 1, 8, "ddp"), mbs=1, seq_length=4096,
                            param_bytes=2, act_bytes=2, checkpointing=True)
    assert bf16["optimizer"] == pytest.approx(memory["optimizer"] / 2)


def test_from_scratch_30b_is_refused_for_its_whole_model_init_and_fits_in_pipeline_stages(tmp_path, env):
    """qwen3-30b-a3b pretrained from scratch on 4 nodes with FSDP2 x EP 8: the step needs ~70 GB,
    but each GPU first initializes the whole fp32 model (122 GB), which FSDP2 and EP split only
    after; the refusal says so and names PP_SIZE, under which each stage initializes its own blocks."""
    text = ("export MODEL=qwen3-30b-a3b\nexport DATASET_NAME=synthetic\nexport SEQ_LENGTH=4096\nexport MBS=1\n"
            "export NUM_GPUS=8\nexport TRAIN_ITERS=1000\nexport DP_SHARDING=fsdp\nexport ACTIVATION_CHECKPOINTING=1\n"
            "export PRECISION=bf16\nexport EP_SIZE=8\n")
    with pytest.raises(PlanError, match=r"initialization 122.1 GB; peak 125.3 GB per GPU, h100 has 80.0 GB; "
                                        r"the fp32 model is initialized whole on every GPU .*\(PP_SIZE"):
        plan_from_conf("pretrain", conf(tmp_path, text), [], env, nnodes=4)
    staged = plan_from_conf("pretrain", conf(tmp_path, text + "export PP_SIZE=4\nexport GBS=64\n"), [], env,
                            nnodes=4)[0].resources
    assert staged["fits"] and staged["memory_per_gpu_bytes"]["initialization"] < 40e9


def test_fsdp_zero2_accumulation_holds_whole_gradients_until_the_step_reduces_them():
    """gradient_sync: fsdp_zero2 reduce-scatters once per step, so accumulated gradients are
    unsharded; fsdp (ZeRO-3) reduce-scatters every micro-batch and keeps them sharded."""
    args = get_model_args("qwen3-8b")
    common = dict(job="qad", mbs=1, seq_length=4096, param_bytes=4, act_bytes=2, checkpointing=True)
    one = memory_breakdown(args, layout=Split(1, 1, 8, "fsdp_zero2"), accumulation=1, **common)
    four = memory_breakdown(args, layout=Split(1, 1, 8, "fsdp_zero2"), accumulation=4, **common)
    ddp = memory_breakdown(args, layout=Split(1, 1, 8, "ddp"), accumulation=4, **common)
    assert four["gradients"] == pytest.approx(8 * one["gradients"]) == pytest.approx(ddp["gradients"])
    zero3 = memory_breakdown(args, layout=Split(1, 1, 8, "fsdp"), accumulation=4, **common)
    assert zero3["gradients"] == pytest.approx(one["gradients"])
    lora = memory_breakdown(args, layout=Split(1, 1, 8, "fsdp_zero2"), accumulation=4, lora=(16, ["q_proj"]), **common)
    lora_one = memory_breakdown(args, layout=Split(1, 1, 8, "fsdp_zero2"), accumulation=1, lora=(16, ["q_proj"]), **common)
    assert lora["gradients"] == pytest.approx(8 * lora_one["gradients"])


def test_a_plan_over_the_gpu_is_refused_with_the_knobs_that_fit(tmp_path, env):
    path = conf(tmp_path, BIG.replace("MBS=4", "MBS=1") + "export ACTIVATION_CHECKPOINTING=1\nexport PRECISION=bf16\n")
    with pytest.raises(PlanError) as error:
        plan_from_conf("pretrain", path, [], env)
    message = str(error.value)
    assert path in message and "more memory than the GPU has" in message and "h100 has 80.0 GB" in message
    assert "optimizer" in message and "activations" in message and "DP_SHARDING=fsdp" in message
    # MEMORY_CHECK=0 starts anyway, with the same message as a warning; a dry run only warns
    plan, _, warnings = plan_from_conf("pretrain", path, [], {**env, "MEMORY_CHECK": "0"})
    assert not plan.resources["fits"] and any("more memory than the GPU has" in w for w in warnings)
    plan, _, warnings = plan_from_conf("pretrain", path, [], env, strict_paths=False)
    assert any("fits with DP_SHARDING=fsdp" in w for w in warnings)
    # DDP, no activation checkpointing and 4 x 4096 tokens: ~390 GB, no single knob is enough
    with pytest.raises(PlanError) as error:
        plan_from_conf("pretrain", conf(tmp_path, BIG), [], env)
    assert "no single knob fits: combine DP_SHARDING=fsdp, ACTIVATION_CHECKPOINTING=1" in str(error.value)


def test_the_gpu_type_and_memory_override(tmp_path, env):
    path = conf(tmp_path, BIG + "export DP_SHARDING=fsdp\nexport ACTIVATION_CHECKPOINTING=1\n")
    plan = plan_from_conf("pretrain", path, [], {**env, "GPU_TYPE": "h200"})[0]
    assert plan.resources["gpu"] == "h200" and plan.resources["gpu_memory_bytes"] == 141e9
    with pytest.raises(PlanError) as error:
        plan_from_conf("pretrain", path, [], {**env, "GPU_MEMORY_GB": "4"})
    assert "has 4.0 GB" in str(error.value)
    for sharding in ([], ["parallel.data_parallel=auto"]):
        with pytest.raises(PlanError) as error:
            plan_from_conf("pretrain", path, sharding, {**env, "GPU_TYPE": "tpu-v5"})
        assert "GPU_TYPE='tpu-v5'" in str(error.value) and "GPU_MEMORY_GB" in str(error.value)


def test_dp_sharding_auto_takes_the_fastest_strategy_that_fits(tmp_path, env):
    small = conf(tmp_path, BIG.replace("qwen3-8b", "qwen3-0.6b") + "export DP_SHARDING=auto\n")
    plan, overrides, _ = plan_from_conf("pretrain", small, [], env)
    assert plan.parallel["data_parallel_strategy"] == "ddp" and "parallel.data_parallel=ddp" in overrides
    big = conf(tmp_path, BIG + "export DP_SHARDING=auto\nexport ACTIVATION_CHECKPOINTING=1\nexport PRECISION=bf16\n")
    plan, overrides, _ = plan_from_conf("pretrain", big, [], env)
    assert plan.parallel["data_parallel_strategy"] in ("fsdp_zero2", "fsdp") and plan.resources["fits"]
    assert f"parallel.data_parallel={plan.parallel['data_parallel_strategy']}" in overrides
    assert all(f"parallel.data_parallel={plan.parallel['data_parallel_strategy']}" in " ".join(c)
               for c in plan.node_commands)


def test_time_and_chained_jobs_from_the_time_limit(tmp_path, env):
    path = conf(tmp_path, BIG + "export DP_SHARDING=fsdp\nexport ACTIVATION_CHECKPOINTING=1\n")
    plan = plan_from_conf("pretrain", path, [], {**env, "SBATCH_TIMELIMIT": "1:00:00"})[0]
    time = plan.resources["time"]
    assert plan.resources["tokens_per_step"] == 8 * 4 * 4096 and plan.resources["total_tokens"] == 1000 * 8 * 4 * 4096
    # 8.2B parameters: ~6 x 8.2e9 x 131072 tokens (+ a third for recomputation) at 35% of 8 x 989 TFLOP/s
    assert 2.0 < time["compute_s"] < 3.5
    assert time["step_s"] == pytest.approx(time["compute_s"] + time["communication_s"])  # train/launch/comms.py
    assert time["wall_s"] == pytest.approx(1000 * time["step_s"])
    assert time["chained_jobs"] == math.ceil(time["wall_s"] / (3600 - 300))  # the save starts 300 s early
    slower = plan_from_conf("pretrain", path, [], {**env, "ASSUMED_MFU": "0.175"})[0].resources["time"]
    assert slower["compute_s"] == pytest.approx(2 * time["compute_s"])
    assert time["time_limit_s"] == 3600  # SBATCH_TIMELIMIT
    wrapper_limit = re.search(r"^#SBATCH --time=(\S+)", open("slurm/pretrain.sh").read(), re.M).group(1)
    assert slower["time_limit_s"] == parse_slurm_time(wrapper_limit)


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("30:00", 1800), ("4:00:00", 14400),
                                           ("1-00:00:00", 86400), ("2-3", 2 * 86400 + 3 * 3600)])
def test_slurm_time_formats(text, seconds):
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("name, job, nodes", [("qwen3-8b", "qad", None), ("qwen3-8b-lora", "finetune", None),
                                              ("llama3-1.5b", "pretrain", None), ("llama3-2.2b", "pretrain", None),
                                              ("qwen3-1.8b", "pretrain", None), ("gpt2-1.36b", "pretrain", None),
                                              ("llama2-1.36b", "pretrain", None), ("qwen3-next-3b", "pretrain", None),
                                              ("qwen3-30b-a3b-thinking-2507-moe", "qad", 4)])
def test_shipped_confs_fit_their_gpus_and_set_seq_length(name, job, nodes, env, capsys):
    text = open(f"conf.d/{name}.conf").read()
    assert "export SEQ_LENGTH=" in text
    argv = ["--job", job, "--config", name, "--dry-run"] + (["--nodes", str(nodes)] if nodes else [])
    os.environ.update({k: v for k, v in env.items() if k != "PATH"})
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    resources = plan["resources"]
    assert resources["fits"], resources["memory_per_gpu_bytes"]
    assert resources["memory_per_gpu_bytes"]["total"] > 20e9  # real sizes, not a tiny stand-in
    assert resources["time"]["step_s"] > 0


def test_fsdp_mixed_precision_gathers_bf16_blocks_and_caches_no_autocast_copies():
    """FSDP2's MixedPrecisionPolicy all-gathers each block in bf16 (half the fp32 block) and computes
    with it, so autocast's bf16 weight copies do not exist; shards, gradients, AdamW stay fp32."""
    args, split = get_model_args("qwen3-8b"), Split(tp=1, ep=1, dp=8, strategy="fsdp")
    common = dict(job="pretrain", layout=split, mbs=1, seq_length=4096, param_bytes=4, act_bytes=2, checkpointing=True)
    autocast, policy = memory_breakdown(args, **common), memory_breakdown(args, **common, fsdp_mixed_precision=True)
    assert policy["gathered"] == pytest.approx(autocast["gathered"] / 2)
    assert autocast["autocast_weights"] > 0 and policy["autocast_weights"] == 0
    for key in ("parameters", "gradients", "optimizer", "activations"):
        assert policy[key] == autocast[key], key
    assert policy["total"] < autocast["total"]


def test_pipeline_stages_hold_their_blocks_and_the_ends_the_embedding_and_lm_head():
    """tiny-llama3 split 1,3: per block attention + SwiGLU + 2 norms, the embedding on stage 0,
    the final norm and the untied lm_head on stage 1; tiny-qwen3 (tied) keeps a copy on each end."""
    args = get_model_args("tiny-llama3")
    D, F, V = args.hidden_size, args.intermediate_size, args.vocab_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    block = D * (q + 2 * kv) + q * D + 3 * D * F + 2 * D
    first, last = pipeline_stages(args, 2, "1,3", accumulation=8)
    assert first.groups == {"embedding": V * D, "experts": 0, "replicated": 0, "dense": block} and first.layers == range(0, 1)
    assert last.groups == {"embedding": V * D, "experts": 0, "replicated": 0, "dense": 3 * block + D} and last.layers == range(1, 4)
    assert (first.in_flight, first.loss, last.in_flight, last.loss) == (2, False, 1, True)
    tied = get_model_args("tiny-qwen3")
    assert [stage.groups["embedding"] for stage in pipeline_stages(tied, 3, "", 8)] == [V * D, 0, V * D]
    assert pipeline_stages(tied, 4, "", accumulation=2)[0].in_flight == 2  # no more than the step's micro-batches


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen3-next", "tiny-gpt2"])
def test_each_planned_stage_holds_the_parameters_of_the_stage_the_job_builds(name):
    """The plan's arithmetic against the real split (train/parallel/pipeline.py split_stage) of a
    meta-device model, PP 2 and PP 3: GPT-2's learned positions on the first stage, a tied
    lm_head on the last as a copy (the split keeps it as the embedding's parameter there)."""
    from train.models import build_model
    from train.parallel.checks import pipeline_layers, rank_stages
    from train.parallel.pipeline import split_stage

    args = get_model_args(name)
    for pp, spec, virtual in ((2, "", 1), (3, "1,1,2", 1), (2, "", 2)):  # 2 x 2: interleaved, 2 stages a rank
        stages = pipeline_stages(args, pp, spec, accumulation=4, virtual=virtual)
        counts = pipeline_layers(args.num_layers, pp, spec, virtual)
        planned = [sum(stage.groups.values()) for stage in stages]
        built = [sum(parameter.numel() for parameter in split_stage(build_model(name, device="meta"),
                                                                     rank_stages(pp, virtual, index),
                                                                     counts).parameters())
                 for index in range(pp)]
        assert planned == built, (pp, virtual, planned, built)
        assert sum(len(stage.layers) for stage in stages) == args.num_layers


def test_pipeline_memory_is_the_stages_share_with_its_micro_batches_in_flight():
    """qwen3-8b, PP 4 (36 blocks: 9 a stage), fp32 master weights: parameters, gradients and
    AdamW of a stage; the first stage keeps 4 micro-batches' block inputs, the last computes the loss;
    DDP over dp 2 inside the stage: one averaging bucket."""
    args = get_model_args("qwen3-8b")
    common = dict(job="pretrain", layout=Split(1, 1, 2, "ddp", pp=4), mbs=1, seq_length=4096, param_bytes=4,
                  act_bytes=2, checkpointing=True, accumulation=8)
    stages = pipeline_stages(args, 4, "", accumulation=8)
    assert [len(stage.layers) for stage in stages] == [9, 9, 9, 9]
    first, last = (memory_breakdown(args, stage=stage, **common) for stage in (stages[0], stages[-1]))
    D, F, q, kv = args.hidden_size, args.intermediate_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    block = D * (q + 2 * kv) + q * D + 2 * args.head_dim + 3 * D * F + 2 * D  # attention, q/k norms, SwiGLU, 2 norms
    elements = args.vocab_size * D + 9 * block
    assert first["parameters"] == 4 * elements and first["optimizer"] == 8 * elements
    assert first["activations"] == 4 * 4096 * 9 * args.hidden_size * 4  # 4 in flight x 9 block inputs, fp32
    assert last["activations"] == 1 * 4096 * 9 * args.hidden_size * 4 and first["loss"] == 0 < last["loss"]
    every = [memory_breakdown(args, stage=stage, **common)["parameters"] for stage in stages]
    assert sum(every) == memory_breakdown(args, **common)["parameters"]  # untied: the stages add up to the model
    # no DDP wrapper on a stage: its averaging flattens one bucket of 25M elements at a time, not every gradient
    assert first["ddp_buckets"] == 25_000_000 * 4 < first["gradients"]
    tiny = memory_breakdown(get_model_args("tiny-llama3"), **common)
    assert tiny["ddp_buckets"] == tiny["gradients"] > 0  # a model under one bucket: all of it


def test_pipeline_fsdp2_stage_holds_whole_gradients_and_blocks_until_the_last_backward():
    """qwen3-8b PP 2 x FSDP2 dp 4: torch's 1F1B stage turns gradient sync and resharding after backward
    off until the step's last backward, so the stage's gradients and blocks are whole (as fsdp_zero2's
    over a step), not 1/4 and two blocks; interleaved 1F1B reduce-scatters each micro-batch's."""
    args = get_model_args("qwen3-8b")
    stage = pipeline_stages(args, 2, "", accumulation=4)[0]
    common = dict(job="pretrain", mbs=1, seq_length=4096, param_bytes=4, act_bytes=2, checkpointing=True,
                  accumulation=4, stage=stage)
    one_f_one_b = memory_breakdown(args, layout=Split(1, 1, 4, "fsdp", pp=2), **common)
    interleaved = memory_breakdown(args, layout=Split(1, 1, 4, "fsdp", pp=2, virtual=2), **common)
    assert one_f_one_b["gradients"] == 4 * sum(stage.groups.values()) == 4 * interleaved["gradients"]
    assert one_f_one_b["gathered"] == 4 * stage.groups["dense"]  # every block of the stage, fp32
    assert interleaved["gathered"] < one_f_one_b["gathered"] / 5


def test_pipeline_plan_takes_the_largest_stage_and_the_bubble(tmp_path, env, capsys):
    """PP_SIZE=2 on 8 GPUs: dp 4, GBS 64 = MBS 4 x 4 x 4 micro-batches; the bubble (p - 1) / (m + p - 1)
    = 1/5 of the compute, which is 5/4 of PP 1's on the same GPUs; --dry-run prints it."""
    text = BIG + "export GBS=64\nexport DP_SHARDING=fsdp\nexport ACTIVATION_CHECKPOINTING=1\nexport PRECISION=bf16\n"
    flat = plan_from_conf("pretrain", conf(tmp_path, text), [], env)[0].resources
    path = conf(tmp_path, text + "export PP_SIZE=2\n")
    piped = plan_from_conf("pretrain", path, [], env)[0].resources
    args = get_model_args("qwen3-8b")
    stages = pipeline_stages(args, 2, "", accumulation=4)
    memory = [memory_breakdown(args, job="pretrain", layout=Split(1, 1, 4, "fsdp", pp=2), mbs=4, seq_length=4096,
                               param_bytes=4, act_bytes=2, checkpointing=True, accumulation=4, stage=stage,
                               fsdp_mixed_precision=True)  # FSDP_MIXED_PRECISION auto: on with bf16 FSDP2
              for stage in stages]
    largest, planned = max(memory, key=lambda m: m["total"]), dict(piped["memory_per_gpu_bytes"])
    # from scratch: each stage is initialized in fp32 before FSDP2 shards it, a peak of its own (the
    # stages hold the whole model's 8.2B less a block; without PP a GPU initializes all of it)
    stage = 4 * sum(stages[0].groups.values())
    assert planned.pop("initialization") == stage < 4 * sum(parameter_groups(args).values())
    assert flat["memory_per_gpu_bytes"]["initialization"] == 4 * sum(parameter_groups(args).values())
    assert planned.pop("total") == max(largest.pop("total"), stage + OVERHEAD_BYTES)
    assert planned == largest
    time = piped["time"]
    assert time["pipeline_bubble"] == pytest.approx(1 / 5) and "pipeline_bubble" not in flat["time"]
    assert time["compute_s"] == pytest.approx(flat["time"]["compute_s"] * 5 / 4)
    assert time["bubble_s"] == pytest.approx(time["compute_s"] / 5)
    assert "pipeline bubble 20% of it" in resource_summary(piped)
    os.environ.update({k: v for k, v in env.items() if k != "PATH"})
    assert main(["--job", "pretrain", "--config", path, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["resources"]["time"]["pipeline_bubble"] == pytest.approx(0.2)


def test_interleaved_pipeline_bubble_is_one_over_the_virtual_stages_of_1f1b(tmp_path, env):
    """PP 2 x 2 virtual stages (PP_SCHEDULE=interleaved_1f1b), m = 4 micro-batches: Megatron's
    bubble (p - 1) / (v m) = 1/8 of the compute (1F1B's: 1/4), 1/9 of the step's compute; rank 0
    keeps (v - 1) x 2 + 2 + 1 = 5 stage forwards of 2 in flight, 2.5 micro-batches of its blocks."""
    text = BIG + "export GBS=64\nexport ACTIVATION_CHECKPOINTING=1\nexport PRECISION=bf16\nexport PP_SIZE=2\n"
    env = {**env, "MEMORY_CHECK": "0"}  # DDP's replicas of qwen3-8b's stages exceed an H100: the time is asked
    one_f_one_b = plan_from_conf("pretrain", conf(tmp_path, text), [], env)[0].resources["time"]
    interleaved = plan_from_conf("pretrain", conf(tmp_path, text + "export PP_SCHEDULE=interleaved_1f1b\n"
                                                  "export PP_VIRTUAL_STAGES=2\n"), [], env)[0].resources["time"]
    assert one_f_one_b["pipeline_bubble"] == pytest.approx(1 / 5)
    assert interleaved["pipeline_bubble"] == pytest.approx(1 / 9)
    ideal = one_f_one_b["compute_s"] * 4 / 5
    assert interleaved["compute_s"] == pytest.approx(ideal * 9 / 8)
    assert interleaved["bubble_s"] == pytest.approx(ideal / 8)
    stages = pipeline_stages(get_model_args("qwen3-8b"), 2, "", accumulation=4, virtual=2)
    assert [stage.in_flight for stage in stages] == [2.5, 1.5]
    assert stages[1].layers == (9, 10, 11, 12, 13, 14, 15, 16, 17, 27, 28, 29, 30, 31, 32, 33, 34, 35)


def test_qad_pipeline_plan_counts_each_stage_share_of_the_teacher(tmp_path, env, capsys):
    """The shipped qwen3-8b QAD conf (FSDP2, 8 GPUs) with PP_SIZE=2: dp 4, and each stage holds its
    share of the bf16 teacher (split like the student, train/parallel/pipeline.py), sharded over dp;
    the two shares add up to the whole teacher. --dry-run plans it (exit 0)."""
    env["MODELS_ROOT"] = str(tmp_path / "no-models")
    flat = plan_from_conf("qad", "qwen3-8b", [], env, strict_paths=False)[0].resources["memory_per_gpu_bytes"]
    shipped = Path(__file__).resolve().parents[2] / "conf.d" / "qwen3-8b.conf"
    path = conf(tmp_path, shipped.read_text() + "export PP_SIZE=2\n")
    piped = plan_from_conf("qad", path, [], env, strict_paths=False)[0].resources["memory_per_gpu_bytes"]
    shares = [(stage.groups["embedding"] + stage.groups["dense"]) * 2 / 4  # bf16, FSDP2 over dp 4
              for stage in pipeline_stages(get_model_args("qwen3-8b"), 2)]
    assert piped["teacher"] in shares and sum(shares) == pytest.approx(flat["teacher"] * 8 / 4)
    assert piped["teacher"] < 0.6 * flat["teacher"] * 8 / 4  # not the whole teacher on each stage
    os.environ.update({k: v for k, v in env.items() if k != "PATH"})
    assert main(["--job", "qad", "--config", path, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["parallel"]["pipeline_parallel"] == 2 and plan["resources"]["memory_per_gpu_bytes"] == piped


def test_fsdp_mixed_precision_auto_is_planned_on_for_bf16_and_off_otherwise(tmp_path, env):
    """FSDP_MIXED_PRECISION unset (auto): a PRECISION=bf16 FSDP2 plan counts bf16 gathered blocks and
    no autocast copies, as FSDP_MIXED_PRECISION=1 does; PRECISION=fp32, or =0, plans fp32 gathers."""
    fsdp = BIG.replace("MBS=4", "MBS=1") + "export DP_SHARDING=fsdp\nexport ACTIVATION_CHECKPOINTING=1\n"
    memory = {}
    bf16 = "export PRECISION=bf16\n"
    for name, extra in (("auto", bf16), ("on", bf16 + "export FSDP_MIXED_PRECISION=1\n"),
                        ("off", bf16 + "export FSDP_MIXED_PRECISION=0\n"), ("fp32", "")):
        path = conf(tmp_path, fsdp + extra)
        memory[name] = plan_from_conf("pretrain", path, [], env)[0].resources["memory_per_gpu_bytes"]
    assert memory["auto"] == memory["on"]
    assert memory["auto"]["gathered"] == pytest.approx(memory["off"]["gathered"] / 2)
    assert memory["auto"]["autocast_weights"] == 0 < memory["off"]["autocast_weights"]
    assert memory["fp32"]["gathered"] == memory["off"]["gathered"]


@pytest.mark.parametrize("name", ["debug-qwen3-next", "tiny-qwen3-moe"])
def test_tensor_parallel_keeps_moe_routers_and_shared_experts_whole(name):
    """The plan's groups match the built model: routed experts, the MoE routers and shared experts
    (whole on every TP rank, train/parallel/tensor_parallel.py) and the rest; at TP 2 a rank
    holds half of the rest and all of the routers and shared experts."""
    from train.launch.comms import parameter_groups
    from train.launch.memory import local_elements
    from train.models import build_model

    model = build_model(name, device="meta")
    counted = {"embedding": 0, "experts": 0, "replicated": 0, "dense": 0}
    for n, p in model.named_parameters():
        group = ("embedding" if n.startswith(("embed_tokens", "lm_head")) else "experts" if ".experts." in n
                 else "replicated" if ".mlp.gate." in n or ".mlp.shared_expert" in n else "dense")
        counted[group] += p.numel()
    groups = parameter_groups(get_model_args(name))
    assert groups == counted and groups["replicated"] > 0
    split = local_elements(groups, Split(tp=2, ep=1, dp=1, strategy="ddp"), False)
    assert split == (counted["dense"] + counted["embedding"]) / 2 + counted["replicated"] + counted["experts"]
