"""The gated MLP of Llama-style blocks, down(silu(gate(x)) * up(x)), keeping one activation less
for backward.

Autograd keeps three tensors of the MLP's width for `silu(gate) * up`: the gate's output (for
silu's backward), silu's output and the up projection's output (for the product's). silu's output
is one elementwise op away from the gate's, so `SiluTimesUp` keeps the other two and computes it
again in backward: about a sixth of what a decoder layer of the default model keeps per token, for
one more silu per layer in backward. Values and gradients are autograd's own, bit for bit: the
same kernels run on the same inputs.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from lmtune.models.recompute import tag


def _silu_times_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SiluTimesUp(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _silu_times_up(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = SiluTimesUp.apply(gate, up)
    tag(product, _silu_times_up, gate, up)  # made again in backward where the down projection keeps it
    return self.down_proj(product)


def is_silu_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether `module` runs transformers' Llama MLP code (Qwen2's, Mistral's and others' are the
    same code) with silu as its activation."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    code, reference = getattr(type(module).forward, "__code__", None), LlamaMLP.forward.__code__
    return (code is not None and code.co_code == reference.co_code
            and code.co_names == reference.co_names
            and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)))


def keep_less_in_gated_mlps(model: torch.nn.Module) -> int:
    """Give each Llama-style silu MLP of `model` the forward that keeps less; how many there were."""
    mlps = [m for m in model.modules() if is_silu_gated_mlp(m)]
    for mlp in mlps:
        mlp.forward = types.MethodType(_forward, mlp)
    return len(mlps)
