"""Outputs of cheap elementwise layers computed again in backward instead of kept.

In a decoder block trained without autocast (fp32, or pure_bf16), autograd keeps, per token, the output of both norms
(each is the input of the adapters or weights of the linear layers after it, needed for their
gradients) and the MLP's silu(gate) * up (the input of its down projection), beside the norms'
inputs and the MLP's gate and up, which it keeps anyway. Each of the three is one cheap elementwise
pass away from what is kept, so here it is not kept: a layer that produced one tags it with how to
make it again, and while a loss runs `recomputing_cheap_outputs()` stores the recipe in its place
(autograd's saved-tensor hooks). Backward makes it once, from the same inputs with the same kernels
(so the same values, bit for bit) and hands it to each node that saved it; it is freed with the
last of them. About a third of what a decoder layer of the default model keeps per token in fp32
compute, for one more norm and one more silu-and-product per layer in backward
(benchmarks/memory_levers.py measures the run without it).

Where a tensor is saved cast to another dtype (bf16 autocast casts a linear layer's input), what is
kept is the cast copy, not the tagged output, and nothing changes. Under FSDP2 or DeepSpeed the
norms' weights are gathered for the forward only, so the engine leaves this off there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_RECIPE = "_lmtune_recipe"


class Recipe:
    """How to make a tensor again: `make(*inputs)` under the autocast state of the forward that
    made it. Checks that no input changed in place since (the result would silently differ)."""

    def __init__(self, make: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                 made: torch.Tensor):
        self.make, self.inputs = make, inputs
        self.versions = [t._version for t in inputs]
        self.made_version = made._version
        self.layout = (made.shape, made.stride(), made.dtype)
        device = made.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.value: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        if self.value is None:
            if [t._version for t in self.inputs] != self.versions:
                raise RuntimeError("an input of a recomputed activation was modified in place after "
                                   "the forward; its backward would use other values.")
            device, enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                self.value = self.make(*self.inputs)
            if (self.value.shape, self.value.stride(), self.value.dtype) != self.layout:
                raise RuntimeError("a recomputed activation came out in another layout than the "
                                   "forward's.")
        return self.value


def tag(output: torch.Tensor, make: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    """Mark `output` as `make(*inputs)`, to be made again in backward rather than kept. Only when
    autograd records (no graph, nothing is saved) and `output` starts its own storage."""
    if torch.is_grad_enabled() and output.storage_offset() == 0 and output.is_contiguous():
        setattr(output, _RECIPE, Recipe(make, inputs, output))


class _Saved:
    """A tagged tensor, or a view of one, as a recipe and the view's geometry."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: Recipe, view: torch.Tensor):
        self.recipe, self.size, self.stride = recipe, view.shape, view.stride()
        self.offset = view.storage_offset()

    def tensor(self) -> torch.Tensor:
        return self.recipe.tensor().as_strided(self.size, self.stride, self.offset)


def _pack(saved: torch.Tensor):
    # A linear layer keeps its input flattened to 2-D: a view, whose base carries the tag.
    base = saved if saved._base is None else saved._base
    recipe = getattr(base, _RECIPE, None)
    # Changed in place since it was made, it no longer is what the recipe makes.
    if recipe is None or saved.dtype != base.dtype or base._version != recipe.made_version:
        return saved
    return _Saved(recipe, saved)


def _unpack(packed):
    return packed.tensor() if isinstance(packed, _Saved) else packed


@contextlib.contextmanager
def recomputing_cheap_outputs() -> Iterator[None]:
    """While this is active, tagged outputs are saved for backward as their recipes."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


def _norm(module: torch.nn.Module) -> bool:
    """A norm of one input whose output depends on that input and its weights only."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _tag_norm_output(module: torch.nn.Module, args: tuple, output) -> None:
    if isinstance(output, torch.Tensor) and len(args) == 1 and isinstance(args[0], torch.Tensor):
        tag(output, module.forward, args[0])


def tag_norm_outputs(model: torch.nn.Module) -> int:
    """Tag the outputs of the model's norms as they are made; how many norms there are. (The
    Llama-style MLPs of models/gated_mlp.py tag their silu(gate) * up themselves.)"""
    norms = [m for m in model.modules() if _norm(m)]
    for norm in norms:
        norm.register_forward_hook(_tag_norm_output)
    return len(norms)
