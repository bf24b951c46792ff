"""The frozen base of an adapter method stored in half precision: half the weights' memory, same math.

Under bf16 autocast every matmul already runs in bf16, casting each fp32 weight on every forward, so
a frozen weight stored in bf16 feeds the same numbers to the same kernels (and the per-forward casts
go away). What autocast does not cast stays as it was: the embedding's output is upcast to fp32, so
the residual stream is fp32 as before, and the small 1-D weights (norms, biases) and everything that
trains are fp32. Left out: full fine-tuning (fp32 master weights), freeze (its output is the whole
model, whose frozen layers would be saved rounded), a quantized base (bitsandbytes stores it), and
FSDP2 (one dtype per sharded unit).
"""

from __future__ import annotations

import torch

from lmtune.config import RunConfig

HALF = (torch.bfloat16, torch.float16)
ADAPTER_METHODS = ("lora", "adalora", "ia3", "prefix", "prompt", "ptuning")


def half_frozen_base(cfg: RunConfig) -> bool:
    """Whether this run stores its frozen base in half precision (frozen_dtype: auto)."""
    from lmtune.distributed import fsdp_settings

    return (cfg.frozen_dtype == "auto" and cfg.bf16 and cfg.finetuning_type in ADAPTER_METHODS
            and cfg.quantization_bit is None and not fsdp_settings(cfg))


def half_dtype(config) -> torch.dtype:
    """The half precision to store a frozen base in: the checkpoint's own when it records float16
    or bfloat16 (no rounding of float16 weights to bf16's shorter mantissa), else bf16."""
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return own if own in HALF else torch.bfloat16


def _fp32_output(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def settle_dtypes(model: torch.nn.Module) -> None:
    """After the method is applied to a base loaded in half precision: what trains, and the frozen
    1-D weights, back to fp32; the embedding hands fp32 to the residual stream. Tied weights stay
    tied (the same Parameter changes its data)."""
    for param in model.parameters():
        if param.dtype in HALF and (param.requires_grad or param.ndim < 2):
            param.data = param.data.float()
    embedding = model.get_input_embeddings()
    if embedding.weight.dtype in HALF:
        embedding.register_forward_hook(_fp32_output)
