"""One additive attention mask per forward, handed to every layer, instead of one made by each.

With a padding mask, or packed rows' block-diagonal one, transformers hands sdpa a boolean mask.
torch turns a boolean mask into an additive one (0 where a query attends, -inf elsewhere, in the
query's dtype) inside every call, and its CPU flash kernel keeps that copy for backward: rows x
length x length values per decoder layer, 480 MiB over 30 layers for one row of 2,048 tokens.
Made once from the layers' common boolean mask, with the same values, it is kept once.
"""

from __future__ import annotations

import weakref

import torch

from lmtune.models.precision import compute_dtype

# (boolean mask, dtype, additive mask), both masks held weakly: the additive one lives as long as
# a layer's backward keeps it (under no_grad it is made again for each layer, as torch would).
_last: tuple[weakref.ref, torch.dtype, weakref.ref] | None = None


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of the boolean `mask` in `dtype`, the same tensor for the same mask."""
    global _last
    if _last is not None and _last[0]() is mask and _last[1] == dtype:
        made = _last[2]()
        if made is not None:
            return made
    made = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _last = (weakref.ref(mask), dtype, weakref.ref(made))
    return made


def _share_mask(module: torch.nn.Module, args: tuple, kwargs: dict):
    mask = kwargs.get("attention_mask")
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
            or not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
        return None
    # the projections keep the residual stream's dtype, or autocast's
    return args, kwargs | {"attention_mask": additive_mask(mask, compute_dtype(hidden_states))}


def share_attention_masks(model: torch.nn.Module) -> int:
    """Hook every sdpa attention module of `model` to take the shared additive mask; returns how
    many. Other attention implementations take their masks in other forms and are left alone."""
    hooked = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if (type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")
                and getattr(config, "_attn_implementation", None) == "sdpa"):
            module.register_forward_pre_hook(_share_mask, with_kwargs=True)
            hooked += 1
    return hooked
