"""flash-attn vs sdpa on CUDA: `python -m pytest tests/gpu/test_models_attention.py -q -m gpu`."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama3", "tiny-gpt2"])
def test_flash_matches_sdpa(name):
    pytest.importorskip("flash_attn")
    from train.models import build_model

    sdpa = build_model(name, device="cuda", dtype=torch.bfloat16, attention_backend="sdpa")
    flash = build_model(name, device="cuda", dtype=torch.bfloat16, attention_backend="flash")
    assert flash.layers[0].self_attn.backend == "flash"
    ids = torch.randint(0, sdpa.args.vocab_size, (4, 256), device="cuda")
    torch.testing.assert_close(flash(ids).float(), sdpa(ids).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gpt2"])
def test_cuda_init_is_deterministic_and_sdpa_matches_reference(name):
    from train.models import build_model

    a = build_model(name, device="cuda", seed=3)
    b = build_model(name, device="cuda", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    reference = build_model(name, device="cuda", seed=3, attention_backend="reference")
    ids = torch.randint(0, a.args.vocab_size, (2, 128), device="cuda")
    torch.testing.assert_close(a(ids), reference(ids), atol=1e-3, rtol=1e-3)
