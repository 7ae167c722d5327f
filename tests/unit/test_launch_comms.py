"""python -m pytest tests/unit/test_launch_comms.py  (the communication plan and --dry-run --scaling)

The bytes are checked against a real gloo step in tests/integration/test_comm_volume.py; here:
which collectives each layout plans, how often, over which link, and the scaling table.
"""

import json
import os

import pytest

from train.launch.comms import (Interconnect, StepShape, communication_plan, interconnect, parameter_groups,
                                step_collectives, tensor_parallel_all_reduces)
from train.launch.conf import CONF_VARIABLES
from train.launch.plan import main
from train.models.registry import get_model_args

DENSE, MOE = get_model_args("qwen3-8b"), get_model_args("qwen3-30b-a3b")


@pytest.fixture(autouse=True)
def clean_os_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in CONF_VARIABLES or name in ("RUN_DATETIME", "SBATCH_TIMELIMIT"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QAD_CHECKPOINT_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("DATACACHE_DIR", str(tmp_path / "data"))


def shape(**changes) -> StepShape:
    base = dict(tp=1, ep=1, dp=8, strategy="ddp", tokens=4096, accumulation=4, param_bytes=4, act_bytes=2,
                gather_bytes=4, checkpointing=True)
    return StepShape(**{**base, **changes})


def by_name(collectives) -> dict:
    return {c.name: c for c in collectives}


def test_ddp_all_reduces_the_gradients_once_per_step_whatever_the_accumulation():
    one, four = (by_name(step_collectives(DENSE, shape(accumulation=a))) for a in (1, 4))
    assert set(four) == {"gradients"}
    gradients = four["gradients"]
    assert (gradients.kind, gradients.times) == ("all_reduce", 1)
    assert gradients.payload_bytes == pytest.approx(sum(parameter_groups(DENSE).values()) * 4)
    assert gradients.bytes_per_rank == pytest.approx(2 * 7 / 8 * gradients.payload_bytes)  # ring all-reduce
    assert one["gradients"].bytes_per_rank == gradients.bytes_per_rank


def test_zero1_all_gathers_the_updated_parameters():
    zero1 = by_name(step_collectives(DENSE, shape(strategy="zero1")))
    assert zero1["updated parameters"].kind == "all_gather"
    assert zero1["updated parameters"].bytes_per_rank == pytest.approx(zero1["gradients"].bytes_per_rank / 2)


def test_fsdp_gathers_and_reduce_scatters_every_micro_batch_zero2_reduces_once():
    zero3 = by_name(step_collectives(DENSE, shape(strategy="fsdp")))
    zero2 = by_name(step_collectives(DENSE, shape(strategy="fsdp_zero2")))
    assert zero3["gradients"].kind == "reduce_scatter" and zero3["gradients"].times == 4
    assert zero2["gradients"].times == 1
    assert zero3["parameters (blocks)"].times == 8 and zero2["parameters (blocks)"].times == 4  # forward + backward
    assert zero3["parameters (root)"].times == zero2["parameters (root)"].times == 4
    mixed = by_name(step_collectives(DENSE, shape(strategy="fsdp", gather_bytes=2)))
    assert mixed["parameters (blocks)"].bytes_per_rank == pytest.approx(zero3["parameters (blocks)"].bytes_per_rank / 2)
    assert mixed["gradients"].bytes_per_rank == zero3["gradients"].bytes_per_rank  # fp32 reduce-scatter


def test_interleaved_stages_reduce_scatter_every_micro_batch_under_zero2_too():
    """Interleaved 1F1B: FSDP2 syncs and reshards in every stage backward, fsdp_zero2 as fsdp."""
    zero2 = by_name(step_collectives(DENSE, shape(strategy="fsdp_zero2", interleaved=True)))
    assert zero2["gradients"].times == 4 and zero2["parameters (blocks)"].times == 8


def test_tensor_parallel_all_reduces_activations_per_block_and_pass():
    """Dense blocks: 2 in forward (again when recomputed), 5 in backward (q, k, v, gate, up_proj's
    input gradients); MoE blocks only their attention's: 1 and 3."""
    tp = by_name(step_collectives(DENSE, shape(tp=8, dp=1, accumulation=2)))
    assert "gradients" not in tp  # one data-parallel rank
    row = 4096 * DENSE.hidden_size * 2  # MBS x SEQ x hidden, bf16
    forward, backward = tp["block activations (forward)"], tp["block activations (backward)"]
    assert forward.payload_bytes == 2 * DENSE.num_layers * row and forward.times == 2 * 2  # + recomputed; 2 micro-batches
    assert backward.payload_bytes == 5 * DENSE.num_layers * row and backward.times == 2
    no_recompute = by_name(step_collectives(DENSE, shape(tp=8, dp=1, accumulation=2, checkpointing=False)))
    assert no_recompute["block activations (forward)"].times == 2
    moe = by_name(step_collectives(MOE, shape(tp=8, dp=1, accumulation=2)))
    moe_row = 4096 * MOE.hidden_size * 2  # every layer a MoE layer
    assert moe["block activations (forward)"].payload_bytes == MOE.num_layers * moe_row
    assert moe["block activations (backward)"].payload_bytes == 3 * MOE.num_layers * moe_row


def test_tensor_parallel_all_reduces_of_gated_deltanet_blocks():
    """tiny-qwen3-next: 3 Gated DeltaNet blocks (in_proj_qkvz and in_proj_ba colwise, out_proj
    rowwise) and 1 gated attention block, layer 0's MLP dense, the others MoE (replicated)."""
    assert tensor_parallel_all_reduces(get_model_args("tiny-qwen3-next")) == (4 + 1, 3 * 2 + 3 + 2)


def test_expert_parallel_moves_routed_tokens_and_reduces_experts_over_their_replicas():
    ep = by_name(step_collectives(MOE, shape(strategy="fsdp", ep=4, dp=8, checkpointing=False)))
    assert ep["routed tokens"].kind == "all_to_all" and ep["routed tokens"].ranks == 4
    assert ep["expert gradients"].ranks == 2 and ep["expert gradients"].times == 1
    assert "routed tokens" not in by_name(step_collectives(DENSE, shape(ep=4)))
    one_replica = by_name(step_collectives(MOE, shape(strategy="fsdp", ep=8, dp=8)))
    assert "expert gradients" not in one_replica


def test_a_sharded_teacher_is_gathered_in_forward_only():
    student_fsdp = by_name(step_collectives(DENSE, shape(strategy="fsdp"), teacher=DENSE, teacher_bytes=2))
    teacher = student_fsdp["teacher parameters (blocks)"]
    assert teacher.times == 4  # once per micro-batch
    assert teacher.payload_bytes == pytest.approx(student_fsdp["parameters (blocks)"].payload_bytes / 2)  # bf16
    student_ddp = by_name(step_collectives(DENSE, shape(strategy="ddp"), teacher=DENSE))
    assert not any(name.startswith("teacher") for name in student_ddp)  # replicated: nothing to gather


def test_a_group_spanning_nodes_runs_at_the_inter_node_bandwidth():
    link = Interconnect(gpus_per_node=8, intra_node_gbps=450, inter_node_gbps=50, overlap=0.25)
    inside = communication_plan(step_collectives(DENSE, shape(dp=8)), link)
    across = communication_plan(step_collectives(DENSE, shape(dp=16)), link)
    assert inside["seconds"] == pytest.approx(inside["bytes_per_rank"] / 450e9)
    assert across["seconds"] == pytest.approx(across["bytes_per_rank"] / 50e9)
    assert across["collectives"][0]["inter_node"] and not inside["collectives"][0]["inter_node"]
    assert inside["exposed_s"] == pytest.approx(0.75 * inside["seconds"])


@pytest.mark.parametrize("name, value", [("INTRA_NODE_GBPS", "0"), ("INTER_NODE_GBPS", "fast"),
                                         ("COMM_OVERLAP", "1.5"), ("COMM_OVERLAP", "-0.1")])
def test_bad_interconnect_values_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        interconnect({name: value}, 8)


def test_the_dry_run_adds_the_exposed_communication_to_the_step(capsys):
    assert main(["--job", "qad", "--config", "qwen3-8b", "--dry-run"]) == 0
    resources = json.loads(capsys.readouterr().out)["resources"]
    time, comms = resources["time"], resources["communication"]
    assert comms["seconds"] > 0
    assert time["step_s"] == pytest.approx(time["compute_s"] + comms["exposed_s"])


def test_scaling_table_keeps_gbs_and_marks_node_counts_it_cannot_split(capsys):
    """qwen3-8b (QAD, GBS 32, MBS 1, 8 GPUs a node): 1, 2, 4 nodes accumulate 4, 2, 1 micro-batches;
    8 nodes would be 64 data-parallel ranks for 32 sequences."""
    assert main(["--job", "qad", "--config", "qwen3-8b", "--dry-run", "--scaling", "1,2,4,8", "--",
                 "TRAIN_ITERS=100"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("qwen3-8b.conf: GBS 32 x 8192 tokens = 262,144 tokens a step at every node "
                                        "count; 8 GPUs a node (h100, MFU 0.35); intra-node 450 GB/s, inter-node "
                                        "50 GB/s, 0 of the communication overlapped")
    cells = table_cells(out)
    assert [row[0] for row in cells] == ["1", "2", "4", "8"]
    assert [row[3] for row in cells[:3]] == ["4", "2", "1"]
    assert cells[3][2].startswith("refused: GBS=32")
    step, compute, communication = ([float(row[i]) for row in cells[:3]] for i in (5, 6, 7))
    assert compute[0] == pytest.approx(2 * compute[1], rel=0.01)  # twice the GPUs, same tokens
    assert communication[1] > communication[0]  # 2 nodes: the data-parallel collectives cross InfiniBand
    assert all(s == pytest.approx(c + m, rel=0.01) for s, c, m in zip(step, compute, communication))


def test_scaling_keeps_the_first_rows_gbs_when_the_conf_sets_none(tmp_path, capsys):
    """No GBS in the conf: MBS x dp at 1 node (8 x 2 = 16 sequences), then refused at 2 nodes
    (32 ranks for 16 sequences) instead of doubling the batch."""
    conf = tmp_path / "no-gbs.conf"
    conf.write_text("export MODEL=qwen3-8b\nexport DATASET_NAME=synthetic\nexport SEQ_LENGTH=4096\nexport MBS=2\n"
                    "export NUM_GPUS=8\nexport DP_SHARDING=fsdp\nexport ACTIVATION_CHECKPOINTING=1\n")
    assert main(["--job", "pretrain", "--config", str(conf), "--dry-run", "--scaling", "1,2"]) == 0
    cells = table_cells(capsys.readouterr().out)
    assert cells[0][3] == "1" and cells[1][2].startswith("refused: GBS=16")


def table_cells(out: str) -> list[list[str]]:
    """The cells of the scaling table's rows (those that start with a node count)."""
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return [[cell.strip() for cell in row] for row in rows]


def test_scaling_refuses_bad_values_before_any_table(capsys):
    assert main(["--job", "qad", "--config", "qwen3-8b", "--dry-run", "--scaling", "1,2", "--",
                 "INTER_NODE_GBPS=0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "INTER_NODE_GBPS" in captured.err
    with pytest.raises(SystemExit):
        main(["--job", "qad", "--config", "qwen3-8b", "--scaling", "1,2"])  # needs --dry-run


def test_pipeline_stages_reduce_their_own_gradients_and_send_activations():
    from train.launch.memory import pipeline_stages

    stages = pipeline_stages(DENSE, pp=4, accumulation=8)
    plans = [by_name(step_collectives(DENSE, shape(dp=2, accumulation=8), groups=stage.groups, stage=index, pp=4))
             for index, stage in enumerate(stages)]
    whole = by_name(step_collectives(DENSE, shape(dp=2, accumulation=8)))["gradients"].payload_bytes
    stage_bytes = [plan["gradients"].payload_bytes for plan in plans]
    assert sum(stage_bytes) == pytest.approx(whole)  # each stage all-reduces its own share, together the model
    row = 4096 * DENSE.hidden_size * 4  # MBS x SEQ x hidden, fp32 master weights
    sends = [plan["stage activations and their gradients"] for plan in plans]
    assert [send.times for send in sends] == [8, 16, 16, 8]  # the first and last stage send one way only
    assert all(send.bytes_per_rank == send.times * row for send in sends)
    assert [send.footprint for send in sends] == [3] * 4  # the next stage's peer is dp x tp = 2 ranks on
    assert not any("tied embedding gradients" in plan for plan in plans)  # qwen3-8b does not tie


def test_a_tied_model_all_reduces_the_embedding_gradient_between_its_first_and_last_stage():
    from train.launch.memory import pipeline_stages

    tied = get_model_args("qwen3-0.6b")
    stages = pipeline_stages(tied, pp=3, accumulation=4)
    plans = [by_name(step_collectives(tied, shape(dp=1), groups=stage.groups, stage=index, pp=3))
             for index, stage in enumerate(stages)]
    assert ["tied embedding gradients" in plan for plan in plans] == [True, False, True]
    tied_row = plans[0]["tied embedding gradients"]
    assert (tied_row.ranks, tied_row.footprint) == (2, 3)  # ranks 0 and 2 of a pp 3 x dp 1 job
    assert tied_row.payload_bytes == tied.vocab_size * tied.hidden_size * 4


def test_tensor_parallel_inside_stages_counts_each_stages_blocks_and_ends():
    """PP 2 x TP 2: stage 0 all-reduces the embedding's output and its blocks' activations, stage 1
    its blocks', lm_head's input gradient and gathers the logits; together the PP 1 traffic."""
    from train.launch.memory import pipeline_stages

    stages = pipeline_stages(DENSE, pp=2, accumulation=4)
    tp = shape(tp=2, dp=1)
    whole = by_name(step_collectives(DENSE, tp))
    first, last = (by_name(step_collectives(DENSE, tp, groups=stage.groups, layers=stage.layers, stage=index, pp=2))
                   for index, stage in enumerate(stages))
    for name in ("block activations (forward)", "block activations (backward)", "embedding and lm_head activations"):
        assert first[name].bytes_per_rank + last[name].bytes_per_rank == pytest.approx(whole[name].bytes_per_rank)
    assert "logits" not in first and last["logits"] == whole["logits"]
    assert first["embedding and lm_head activations"].times == last["embedding and lm_head activations"].times == 4


def test_interleaved_stages_send_once_per_stage_edge_and_keep_the_ends():
    """PP 2 x 2 virtual stages: rank 0 holds stages 0 and 2 (3 sends a micro-batch: 0 -> 1, and 2's
    receive and send), rank 1 stages 1 and 3 (3 too), against 1F1B's 1 each; the gradients are
    still each rank's share, together the model's."""
    from train.launch.memory import pipeline_stages

    stages = pipeline_stages(DENSE, pp=2, accumulation=4, virtual=2)
    plans = [by_name(step_collectives(DENSE, shape(dp=2, accumulation=4), groups=stage.groups, layers=stage.layers,
                                      stage=index, pp=2, virtual=2))
             for index, stage in enumerate(stages)]
    assert [plan["stage activations and their gradients"].times for plan in plans] == [12, 12]
    whole = by_name(step_collectives(DENSE, shape(dp=2, accumulation=4)))["gradients"].payload_bytes
    assert sum(plan["gradients"].payload_bytes for plan in plans) == pytest.approx(whole)
