"""modelopt quantization of GroupedExperts (train.models.common.moe).

    from train.quant.experts import register_grouped_experts; register_grouped_experts()

Grouped expert weights are 3-D Parameters, not nn.Linear, so mtq.quantize would skip them
silently. Registering this QuantModule gives every GroupedExperts the quantizers modelopt
gives HF's fused experts, with the same names:
  gate_up_proj_input_quantizer   tokens (N, D) into the first grouped GEMM
  gate_up_proj_weight_quantizer  (E, 2F, D), blocks along D (the reduction dimension)
  down_proj_input_quantizer      silu(gate) * up, (N, F)
  down_proj_weight_quantizer     (E, D, F), blocks along F
so the quant config's '*weight_quantizer' / '*input_quantizer' patterns reach them, while the
router (mlp.gate, an nn.Linear) stays out through modelopt's default '*mlp.gate.*' exclusion.
Unlike modelopt's HF wrapper (one weight quantizer per expert), one quantizer covers all the
experts of a layer: one fake-quant call per GEMM, no Python loop over experts; NVFP4 scales
are per 16-element block either way, only the per-tensor (second-level) amax is shared.
Under expert parallelism the module holds the E/EP local experts and the all-to-all stays in
MoE.expert_dispatch, so quantizing before or after apply_expert_parallel both work; modelopt's
MAX all-reduce of the amax over the ranks then covers all E experts.
"""

from __future__ import annotations

import threading

from train.models.common.moe import GroupedExperts, swiglu_experts

_lock = threading.Lock()
_registered: list = []


def register_grouped_experts():
    """Register the QuantModule for GroupedExperts with modelopt (idempotent); returns its class."""
    with _lock:
        if _registered:
            return _registered[0]
        from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer

        class QuantGroupedExperts(QuantModule):
            def _setup(self):
                self.gate_up_proj_input_quantizer = TensorQuantizer()
                self.gate_up_proj_weight_quantizer = TensorQuantizer()
                self.down_proj_input_quantizer = TensorQuantizer()
                self.down_proj_weight_quantizer = TensorQuantizer()

            def forward(self, x, tokens_per_expert):
                return swiglu_experts(self.gate_up_proj_input_quantizer(x), tokens_per_expert,
                                      self.gate_up_proj_weight_quantizer(self.gate_up_proj),
                                      self.down_proj_weight_quantizer(self.down_proj),
                                      hidden_hook=self.down_proj_input_quantizer)

        # modelopt's register_fused_experts_on_the_fly claims any module with 3-D gate_up_proj /
        # down_proj (its HF wrapper, another forward signature) when mtq.quantize ran first: ours wins.
        if QuantModuleRegistry.get(GroupedExperts) is not None:
            QuantModuleRegistry.unregister(GroupedExperts)
        QuantModuleRegistry.register({GroupedExperts: "train.GroupedExperts"})(QuantGroupedExperts)
        _registered.append(QuantGroupedExperts)
        return QuantGroupedExperts
