"""LoRA layers under autocast hand a half-precision input to their A matrix as it is.

peft widens a LoRA layer's input to the dtype of its A matrix (fp32) before the A product; under
bf16 autocast that product then narrows the widened copy back to bf16, and the copy is what it keeps
for A's gradient. For an input already in the autocast dtype (an attention output, the MLP's
product: everything a matmul made under autocast) the round trip gives back the same values, so
here the input goes to A as it is: autocast casts A's weight instead, the product is the same, bit
for bit, and what A keeps is the input itself, which the layers before it keep anyway (or
models/recompute.py makes again). Two elementwise copies per LoRA layer and forward fewer, and one
bf16 copy per layer less kept for backward.

Only for layers where the input goes straight into A's matmul: plain LoRA (no DoRA or other
variant) with no dropout (dropout on the widened copy would round differently).
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer


def _cast_input_dtype(self, x: torch.Tensor | None, dtype: torch.dtype):
    if x is not None and torch.is_autocast_enabled(x.device.type) \
            and x.dtype == torch.get_autocast_dtype(x.device.type):
        return x
    return BaseTunerLayer._cast_input_dtype(self, x, dtype)


def takes_input_as_is(layer: torch.nn.Module) -> bool:
    """Whether `layer` is a plain LoRA linear layer whose input reaches its A matmul directly."""
    return (isinstance(layer, LoraLinear) and not layer.lora_variant
            and all(isinstance(d, torch.nn.Identity) for d in layer.lora_dropout.values()))


def pass_half_inputs_as_they_are(model: torch.nn.Module) -> int:
    """Give every plain LoRA layer of `model` without dropout the input handling above; how many."""
    layers = [m for m in model.modules() if takes_input_as_is(m)]
    for layer in layers:
        layer._cast_input_dtype = types.MethodType(_cast_input_dtype, layer)
    return len(layers)
