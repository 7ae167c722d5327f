"""Gated DeltaNet on CUDA: `python -m pytest -q -m gpu tests/gpu/test_gated_deltanet_cuda.py`.

Our chunked rule against the recurrent reference on the GPU, and against flash-linear-attention's
kernel and causal-conv1d when they are installed (the 'auto' dispatch of GatedDeltaNet). Every test
compares two different implementations, or skips saying which package is missing.
"""

import pytest
import torch

from train.models.common import gated_deltanet as gdn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def inputs(seq_len=300, heads=4, dk=64, dv=64, dtype=torch.float32):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, seq_len, heads, dk, device="cuda", generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(2, seq_len, heads, dv, device="cuda", generator=gen, dtype=dtype)
    g = -torch.rand(2, seq_len, heads, device="cuda", generator=gen)
    beta = torch.rand(2, seq_len, heads, device="cuda", generator=gen)
    return q, k, v, g, beta


def test_chunked_matches_recurrent_on_cuda():
    args = inputs()
    torch.testing.assert_close(gdn.chunk_gated_delta_rule(*args), gdn.recurrent_gated_delta_rule(*args),
                               atol=1e-4, rtol=1e-4)


def test_fla_kernel_matches_our_chunked_rule():
    kernel = gdn.fla_chunk_gated_delta_rule()
    if kernel is None:
        pytest.skip("flash-linear-attention is not installed")
    q, k, v, g, beta = inputs(dtype=torch.bfloat16)
    ours = gdn.chunk_gated_delta_rule(q, k, v, g, beta).float()
    theirs, _ = kernel(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(theirs.float(), ours, atol=3e-2, rtol=3e-2)


def test_module_auto_dispatch_matches_the_recurrent_rule():
    """'auto' on CUDA (fla / causal-conv1d when installed, else our chunked rule) against the recurrent
    rule: two different implementations whatever is installed."""
    module = gdn.GatedDeltaNet(256, 4, 8, 32, 32, device="cuda")
    module.init_parameters(torch.Generator(device="cuda").manual_seed(0), 0.02)
    x = torch.randn(2, 200, 256, device="cuda")
    module.kernel = "recurrent"
    reference = module(x)
    module.kernel = "auto"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = module(x)
    torch.testing.assert_close(fast.float(), reference, atol=5e-2, rtol=5e-2)


def test_module_with_installed_kernels_matches_pure_pytorch():
    """The installed kernels against our chunked rule, in the same module (skipped, with the reason,
    when neither is installed: 'auto' would then be the chunked rule itself)."""
    if gdn.fla_chunk_gated_delta_rule() is None and gdn.causal_conv1d_kernel() is None:
        pytest.skip("neither flash-linear-attention nor causal-conv1d is installed: nothing to compare")
    module = gdn.GatedDeltaNet(256, 4, 8, 32, 32, device="cuda")
    module.init_parameters(torch.Generator(device="cuda").manual_seed(0), 0.02)
    x = torch.randn(2, 200, 256, device="cuda")
    module.kernel = "chunk"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = module(x)
    module.kernel = "auto"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = module(x)
    torch.testing.assert_close(fast.float(), reference.float(), atol=5e-2, rtol=5e-2)
