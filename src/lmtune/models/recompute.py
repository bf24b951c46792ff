"""Outputs of cheap elementwise layers computed again in backward instead of kept.

In a decoder block, autograd keeps, per token, the output of both norms (each is the input of the
adapters or weights of the linear layers after it, needed for their gradients) and the MLP's
silu(gate) * up (the input of its down projection), beside the norms' inputs and the MLP's gate
and up, which it keeps anyway. Each of the three is one cheap elementwise
pass away from what is kept, so here it is not kept: a layer that produced one tags it with how to
make it again, and while a loss runs `recomputing_cheap_outputs()` stores the recipe in its place
(autograd's saved-tensor hooks). Backward makes it once, from the same inputs with the same kernels
(so the same values, bit for bit) and hands it to each node that saved it; it is freed with the
last of them. About a third of what a decoder layer of the default model keeps per token in fp32
compute, for one more norm and one more silu-and-product per layer in backward
(benchmarks/memory_levers.py measures the run without it).

Under autocast a linear layer keeps the bf16 copy autocast makes of its input (one per layer that
reads a norm's output: q, k and v, gate and up), not the tagged output; such a copy is recognised by
its autograd node (a copy of the tagged output's node) and stored as the recipe plus the cast, made
again once per dtype in backward. Under FSDP2 or DeepSpeed the norms' weights are gathered for the
forward only, so the engine leaves this off there.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch

_RECIPE = "_lmtune_recipe"
# While a loss runs: the autograd node of each tagged output -> (that node, its recipe), to know
# autocast's copies of it. The node is held so that its id stays its own until the forward ends; the
# recipe only weakly, as it holds its inputs: in a checkpointed layer nothing else keeps them.
_made_by: list[dict[int, tuple[object, weakref.ref]]] = []


class Recipe:
    """How to make a tensor again: `make(*inputs)` under the autocast state of the forward that
    made it. Checks that no input changed in place since (the result would silently differ)."""

    def __init__(self, make: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                 made: torch.Tensor):
        self.make, self.inputs = make, inputs
        self.versions = [t._version for t in inputs]
        self.made, self.made_version = weakref.ref(made), made._version
        self.layout = (made.shape, made.stride(), made.dtype)
        device = made.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.value: torch.Tensor | None = None
        self.casts: dict[torch.dtype, torch.Tensor] = {}

    def unchanged(self) -> bool:
        """Whether the tensor it made is alive and as made (not changed in place since)."""
        made = self.made()
        return made is not None and made._version == self.made_version

    def tensor(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor made again, or its copy in `dtype` (as autocast made it: `.to(dtype)`)."""
        if dtype is not None and dtype != self.layout[2]:
            if dtype not in self.casts:
                self.casts[dtype] = self.tensor().to(dtype)
            return self.casts[dtype]
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
        recipe = Recipe(make, inputs, output)
        setattr(output, _RECIPE, recipe)
        if _made_by and output.grad_fn is not None:
            _made_by[-1][id(output.grad_fn)] = (output.grad_fn, weakref.ref(recipe))


class _Saved:
    """A tagged tensor, or a copy of one in another dtype, or a view of either: a recipe, the
    dtype and the view's geometry."""

    __slots__ = ("recipe", "dtype", "size", "stride", "offset")

    def __init__(self, recipe: Recipe, dtype: torch.dtype, view: torch.Tensor):
        self.recipe, self.dtype, self.size, self.stride = recipe, dtype, view.shape, view.stride()
        self.offset = view.storage_offset()

    def tensor(self) -> torch.Tensor:
        return self.recipe.tensor(self.dtype).as_strided(self.size, self.stride, self.offset)


def _copied_from(copy: torch.Tensor) -> Recipe | None:
    """The recipe of the tagged output `copy` is a dtype copy of (autocast's cast), if it is one."""
    node = copy.grad_fn
    if node is None or not _made_by or node.name() != "ToCopyBackward0":
        return None
    source = node.next_functions[0][0]
    entry = _made_by[-1].get(id(source))
    if entry is None or entry[0] is not source:
        return None
    recipe = entry[1]()
    made = recipe.made() if recipe is not None else None
    if made is None:
        return None
    shape, stride, _ = recipe.layout
    same_layout = copy.shape == shape and copy.stride() == stride and copy.storage_offset() == 0
    return recipe if same_layout and copy.device == made.device else None


def _pack(saved: torch.Tensor):
    # A linear layer keeps its input flattened to 2-D: a view, whose base carries the tag.
    base = saved if saved._base is None else saved._base
    recipe = getattr(base, _RECIPE, None) or _copied_from(base)
    # Changed in place since it was made, it no longer is what the recipe makes.
    if recipe is None or saved.dtype != base.dtype or not recipe.unchanged():
        return saved
    return _Saved(recipe, base.dtype, saved)


def _unpack(packed):
    return packed.tensor() if isinstance(packed, _Saved) else packed


@contextlib.contextmanager
def recomputing_cheap_outputs() -> Iterator[None]:
    """While this is active, tagged outputs (and autocast's copies of them) are saved for backward
    as their recipes."""
    _made_by.append({})
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _made_by.pop()


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
