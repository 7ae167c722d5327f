"""python -m pytest tests/unit/test_parallel_checks.py  (one process, no process group: checks, AC, compile wrapping)"""

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from train.models import build_model, get_model_args, init_weights
from train.parallel.apply import apply_activation_checkpointing
from train.parallel.checks import fsdp_mixed_precision_on, interleaved_rounds_error, pipeline_layers, rank_stages
from train.parallel.pipeline import StageChunk, balance_loss, split_stage
from train.parallel import (ParallelSettingsError, build_mesh, check_engine_support, check_parallel_settings,
                            parallelize)


def settings(**overrides):
    values = dict(tensor_parallel_size=1, pipeline_parallel_size=1, pipeline_layers="", expert_parallel_size=1,
                  pipeline_schedule="1f1b", virtual_stages=1, data_parallel="ddp", activation_checkpointing=False, compile=False, fsdp_mixed_precision="auto")
    return SimpleNamespace(**{**values, **overrides})


def test_checks_import_without_torch():
    code = "import sys, train.parallel.checks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp_zero2", "zero1"])
def test_every_strategy_is_accepted(strategy):
    check_parallel_settings(settings(data_parallel=strategy), get_model_args("tiny-qwen3"), world_size=8)


@pytest.mark.parametrize("overrides, world_size, message", [
    (dict(data_parallel="zero3"), 2, "parallel.data_parallel='zero3'"),
    (dict(pipeline_parallel_size=2, expert_parallel_size=2), 4, "EP_SIZE=2 but .* is dense"),
    (dict(tensor_parallel_size=4), 4, "TP_SIZE=4 does not divide num_kv_heads=2"),  # tiny: 4 heads, 2 KV
    (dict(tensor_parallel_size=2, data_parallel="ddp"), 4, "use fsdp or fsdp_zero2"),
    (dict(tensor_parallel_size=2, data_parallel="zero1"), 4, "use fsdp or fsdp_zero2"),
    (dict(fsdp_mixed_precision="sometimes"), 2, "parallel.fsdp_mixed_precision='sometimes'"),
])
def test_impossible_settings_are_named(overrides, world_size, message):
    with pytest.raises(ParallelSettingsError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_parallel_settings(settings(**overrides), get_model_args("tiny-qwen3"), world_size)


@pytest.mark.parametrize("setting, precision, cuda, on", [
    ("auto", "bf16", True, True), ("auto", "bf16", False, False), ("auto", "fp32", True, False),
    (True, "fp32", False, True), ("1", "fp32", False, True), ("True", "bf16", True, True),
    (False, "bf16", True, False), ("0", "bf16", True, False), ("false", "bf16", True, False),
])
def test_fsdp_mixed_precision_auto_is_on_for_bf16_on_cuda_only(setting, precision, cuda, on):
    """auto: FSDP2's MixedPrecisionPolicy on GPUs with PRECISION=bf16; the CPU keeps autocast;
    true/1 (a conf's FSDP_MIXED_PRECISION=1, a CLI's true) and false/0 as given."""
    assert fsdp_mixed_precision_on(setting, precision, cuda) is on


@pytest.mark.parametrize("model, overrides, message", [
    ("tiny-qwen3-moe", dict(pipeline_parallel_size=2, expert_parallel_size=8, data_parallel="fsdp"),
     r"EP_SIZE=8 does not divide the data-parallel size 4 \(8 GPUs / TP_SIZE 1 / PP_SIZE 2\)"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, data_parallel="zero1"), "PP_SIZE=2 with parallel.data_parallel='zero1'"),
    ("tiny-llama3", dict(pipeline_parallel_size=5), "PP_SIZE=5 exceeds the model's 4 layers"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, pipeline_layers="1,2"), "add up to the model's 4 layers"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, pipeline_layers="4,0"), "counts of at least 1"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, pipeline_layers="1,2,1"), "needs PP_SIZE=2 counts"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, pipeline_layers="a,b"), "not a comma-separated list"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, pipeline_schedule="gpipe"),
     "parallel.pipeline_schedule='gpipe' \\(PP_SCHEDULE\\): use one of 1f1b, interleaved_1f1b"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, virtual_stages=2),
     "parallel.virtual_stages=2 \\(PP_VIRTUAL_STAGES\\) with parallel.pipeline_schedule='1f1b'"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b"),
     "interleaving needs at least 2 stages per rank"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b", virtual_stages=3),
     "PP_SIZE x PP_VIRTUAL_STAGES = 2 x 3 = 6 exceeds the model's 4 layers"),
    ("tiny-llama3", dict(pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b", virtual_stages=2,
                         pipeline_layers="1,3"), "needs PP_SIZE x PP_VIRTUAL_STAGES = 2 x 2 = 4 counts"),
])
def test_pipeline_settings_that_cannot_run_are_named(model, overrides, message):
    with pytest.raises(ParallelSettingsError, match=message):
        check_parallel_settings(settings(**overrides), get_model_args(model), world_size=8)


def test_experts_split_inside_each_pipeline_stage():
    """PP 2 x EP 2 on 8 GPUs: each stage's 4 data-parallel ranks hold the experts in halves."""
    check_parallel_settings(settings(pipeline_parallel_size=2, expert_parallel_size=2),
                            get_model_args("tiny-qwen3-moe"), world_size=8)


@pytest.mark.parametrize("num_layers, pp, spec, counts", [
    (4, 2, "", [2, 2]), (18, 4, "", [4, 5, 5, 4]), (8, 3, "", [2, 4, 2]), (2, 2, "", [1, 1]),
    (5, 5, "", [1, 1, 1, 1, 1]), (4, 2, "1,3", [1, 3]),
])
def test_pipeline_layers_balance_embedding_and_lm_head(num_layers, pp, spec, counts):
    """Balanced: the embedding and lm_head count as a block each on the first and last stage."""
    assert pipeline_layers(num_layers, pp, spec) == counts


def test_interleaved_stages_are_balanced_over_all_stages_and_placed_round_robin():
    """PP 2 x 2 virtual stages: 4 stages balanced as PP 4's; rank 1 holds stages 1 and 3."""
    assert pipeline_layers(18, 2, "", virtual=2) == pipeline_layers(18, 4) == [4, 5, 5, 4]
    assert pipeline_layers(8, 2, "1,2,3,2", virtual=2) == [1, 2, 3, 2]
    assert rank_stages(2, 2, 1) == [1, 3] and rank_stages(4, 3, 0) == [0, 4, 8] and rank_stages(3, 1, 2) == [2]


@pytest.mark.parametrize("pp, micro_batches, refused", [(2, 8, False), (4, 10, False), (4, 3, False), (4, 6, False),
                                                       (4, 9, True), (2, 5, True)])
def test_interleaved_micro_batches_split_into_equal_rounds(pp, micro_batches, refused):
    """torch's rule: max(1, m // pp) rounds must divide m (4 x 9: 2 rounds of 4.5)."""
    problem = interleaved_rounds_error(pp, micro_batches)
    assert (problem is not None) == refused
    if refused:
        assert f"the {micro_batches} micro-batches" in problem and f"PP_SIZE={pp}" in problem


@pytest.mark.parametrize("model", ["tiny-llama3", "tiny-qwen3", "tiny-qwen3-moe"])
def test_pipeline_of_llama_qwen3_tied_and_moe_models_is_accepted(model):
    check_parallel_settings(settings(pipeline_parallel_size=2, pipeline_layers="1,3"), get_model_args(model),
                            world_size=4)


@pytest.mark.parametrize("data_parallel", ["fsdp", "fsdp_zero2", "ddp"])
def test_interleaved_stages_over_sharded_data_parallel_ranks_are_accepted(data_parallel):
    """FSDP2 inside the interleaved stages: PP 2 x DP 4 on 8 GPUs, and PP 2 x TP 2 x DP 2."""
    interleaved = dict(pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b", virtual_stages=2)
    check_parallel_settings(settings(**interleaved, data_parallel=data_parallel), get_model_args("tiny-qwen3"),
                            world_size=8)
    if data_parallel != "ddp":  # TP with DDP is refused
        check_parallel_settings(settings(**interleaved, tensor_parallel_size=2, data_parallel=data_parallel),
                                get_model_args("tiny-qwen3"), world_size=8)


@pytest.mark.parametrize("overrides, world_size, message", [
    (dict(expert_parallel_size=2), 2, "EP_SIZE=2 but model tiny-qwen3 is dense"),
    (dict(expert_parallel_size=3), 6, "EP_SIZE=3 does not divide the 8 experts of model tiny-qwen3-moe"),
    (dict(expert_parallel_size=4), 2, "EP_SIZE=4 does not divide the data-parallel size 2"),
    (dict(expert_parallel_size=2, tensor_parallel_size=2, data_parallel="fsdp"), 2,
     "EP_SIZE=2 does not divide the data-parallel size 1"),
])
def test_expert_parallel_checks(overrides, world_size, message):
    model = "tiny-qwen3" if "dense" in message else "tiny-qwen3-moe"
    with pytest.raises(ParallelSettingsError, match=message):
        check_parallel_settings(settings(**overrides), get_model_args(model), world_size)


def test_expert_parallel_accepted_and_experts_from_a_config_json():
    check_parallel_settings(settings(expert_parallel_size=8), get_model_args("tiny-qwen3-moe"), world_size=16)
    check_parallel_settings(settings(expert_parallel_size=4), None, world_size=8, num_experts=128)
    with pytest.raises(ParallelSettingsError, match="EP_SIZE=4 does not divide the 6 experts of the model"):
        check_parallel_settings(settings(expert_parallel_size=4), None, world_size=8, num_experts=6)


def test_engine_refuses_what_it_cannot_run():
    check_engine_support(settings(expert_parallel_size=2))
    check_engine_support(settings(expert_parallel_size=2, tensor_parallel_size=2, data_parallel="fsdp"))
    with pytest.raises(ParallelSettingsError, match="EP_SIZE=2 with parallel.data_parallel='zero1'"):
        check_engine_support(settings(expert_parallel_size=2, data_parallel="zero1"))


def test_expert_parallel_needs_processes():
    with pytest.raises(ValueError, match="TP_SIZE=1 x EP_SIZE=2 needs 2 processes"):
        build_mesh(1, 1, ep=2)


def test_tensor_parallel_alone_may_use_the_default_strategy():
    # TP_SIZE = world size: data-parallel size 1, nothing for DDP to do.
    check_parallel_settings(settings(tensor_parallel_size=2), get_model_args("tiny-qwen3"), world_size=2)


def test_one_process_has_no_mesh():
    assert build_mesh(1, 1) is None
    with pytest.raises(ValueError, match="TP_SIZE=2 needs 2 processes"):
        build_mesh(1, 2)


def test_one_process_leaves_the_model_alone():
    model = init_weights(build_model("debug-qwen3", device="cpu"), 0)
    assert parallelize(model, settings(data_parallel="fsdp"), None, "cpu") is model


def test_activation_checkpointing_keeps_names_outputs_and_gradients():
    reference = init_weights(build_model("debug-llama3", device="cpu"), 0)
    model = parallelize(init_weights(build_model("debug-llama3", device="cpu"), 0),
                        settings(activation_checkpointing=True), None, "cpu")
    assert any(name.endswith("_checkpoint_wrapped_module") for name, _ in model.named_modules())
    assert list(model.state_dict()) == list(reference.state_dict())  # checkpoints keep HF names
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    for m in (reference, model):
        m(tokens).float().logsumexp(-1).mean().backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_compile_wraps_each_block_in_place():
    # Only the wrapping: an inductor compile on CPU takes about a minute.
    model = parallelize(init_weights(build_model("debug-qwen3", device="cpu"), 0), settings(compile=True), None, "cpu")
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert list(model.state_dict())[1].startswith("layers.0.")


def test_pipeline_stages_keep_the_whole_models_names_and_compose_to_it():
    """Stages 1,3 of tiny-llama3: disjoint parameters under the whole model's names (also after
    activation checkpointing, whose wrappers see the gaps in the block indices), and stage 1's
    forward of stage 0's output is the whole model's final hidden state."""
    whole = init_weights(build_model("tiny-llama3", device="cpu"), 0)
    stages = [split_stage(copy.deepcopy(whole), [stage], [1, 3]) for stage in range(2)]
    apply_activation_checkpointing(stages[1])
    names = [set(stage.state_dict()) for stage in stages]
    assert names[0] | names[1] == set(whole.state_dict()) and not names[0] & names[1]
    assert {"embed_tokens.weight", "layers.0.mlp.up_proj.weight"} <= names[0]
    assert {"layers.1.mlp.up_proj.weight", "layers.3.self_attn.o_proj.weight", "lm_head.weight"} <= names[1]
    tokens = torch.randint(0, whole.args.vocab_size, (2, 8))
    torch.testing.assert_close(stages[1](stages[0](tokens)), whole(tokens, return_hidden=True))


@pytest.mark.parametrize("counts", [[1, 3], [2, 2]], ids=["dense-first-stage", "moe-on-both"])
def test_moe_stages_pass_on_the_balance_statistics_of_the_whole_model(counts):
    """tiny-qwen3-moe (layer 0 dense): the last stage's load-balancing loss from the balance sums
    the stages pass on equals the whole model's auxiliary_loss, value and router gradients."""
    whole = init_weights(build_model("tiny-qwen3-moe", device="cpu"), 0)
    stages = [split_stage(copy.deepcopy(whole), [stage], counts) for stage in range(2)]
    tokens = torch.randint(0, whole.args.vocab_size, (2, 8))
    hidden, balance = stages[1](*stages[0](tokens))
    torch.testing.assert_close(hidden, whole(tokens, return_hidden=True))
    expected, actual = whole.auxiliary_loss(), balance_loss(stages[1], balance)
    torch.testing.assert_close(actual, expected)
    expected.backward()
    actual.backward()
    for index in range(1, 4):  # the MoE layers' routers, on whichever stage holds them
        stage = stages[0] if index < counts[0] else stages[1]
        router = stage.get_submodule(f"layers.{index}.mlp.gate")  # the stage keeps the index in the name
        torch.testing.assert_close(router.weight.grad, whole.layers[index].mlp.gate.weight.grad)


@pytest.mark.parametrize("model", ["tiny-llama3", "tiny-qwen3-moe"])
def test_interleaved_chunks_in_stage_order_compose_to_the_whole_model(model):
    """PP 2 x 2 virtual stages of one block each: rank 0's model holds stages 0 and 2, rank 1's
    stages 1 and 3; their chunks run 0, 1, 2, 3 give the whole model's final hidden state, and
    for tiny-qwen3-moe the balance sums give its auxiliary loss and router gradients."""
    whole = init_weights(build_model(model, device="cpu"), 0)
    ranks = [split_stage(copy.deepcopy(whole), rank_stages(2, 2, rank), [1, 1, 1, 1]) for rank in range(2)]
    assert ranks[0].lm_head is None and ranks[1].embed_tokens is None
    assert sorted(ranks[1].layers._modules) == ["1", "3"]
    chunks = [StageChunk(ranks[stage % 2], stage, layers, 4) for stage in range(4)
              for chunk_stage, layers in ranks[stage % 2].pipeline_chunks if chunk_stage == stage]
    assert len(chunks) == 4 and not list(chunks[0].parameters())  # no submodule: the names stay the model's
    tokens = torch.randint(0, whole.args.vocab_size, (2, 8))
    output = chunks[0](tokens)
    for chunk in chunks[1:]:
        output = chunk(*output) if isinstance(output, tuple) else chunk(output)
    hidden = output[0] if isinstance(output, tuple) else output
    torch.testing.assert_close(hidden, whole(tokens, return_hidden=True))
    if whole.args.num_experts:
        expected, actual = whole.auxiliary_loss(), balance_loss(ranks[1], output[1])
        torch.testing.assert_close(actual, expected)
        expected.backward()
        actual.backward()
        for index in range(1, 4):
            router = ranks[index % 2].get_submodule(f"layers.{index}.mlp.gate")
            torch.testing.assert_close(router.weight.grad, whole.layers[index].mlp.gate.weight.grad)
