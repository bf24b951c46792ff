"""Norm outputs and the MLP's silu(gate) * up made again in backward instead of kept: the same
loss and gradients as autograd keeping them, bit for bit, on a real model, and less kept."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lmtune.models import recompute
from lmtune.models.gated_mlp import keep_less_in_gated_mlps
from lmtune.models.lora_inputs import pass_half_inputs_as_they_are
from lmtune.models.recompute import recomputing_cheap_outputs, tag, tag_norm_outputs
from tests.conftest import method_model


def kept_and_recipes(model: torch.nn.Module, batch: dict, recomputing: bool):
    """The loss, the bytes autograd keeps for backward, and how many saves became recipes."""
    sizes: dict[int, int] = {}
    recipes = []

    def pack(t: torch.Tensor):
        packed = recompute._pack(t) if recomputing else t
        if isinstance(packed, torch.Tensor):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        else:
            recipes.append(packed)
        return packed

    # the module's own hooks (and what they note during the forward), wrapped to count
    outer = recomputing_cheap_outputs() if recomputing else contextlib.nullcontext()
    with outer, torch.autograd.graph.saved_tensors_hooks(pack, recompute._unpack):
        loss = model(**batch).loss
    return loss, sum(sizes.values()), len(recipes)


def build(model_dir: str, method: str) -> torch.nn.Module:
    model = method_model(model_dir, method)
    keep_less_in_gated_mlps(model)
    return model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_same_loss_and_gradients_with_less_kept(tiny_model_dir, method):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain, lean = build(tiny_model_dir, method), build(tiny_model_dir, method)
    config = plain.config
    assert tag_norm_outputs(lean) == 2 * config.num_hidden_layers + 1
    results = []
    for model, recomputing in ((plain, False), (lean, True)):
        loss, kept, recipes = kept_and_recipes(model, batch, recomputing)
        loss.backward()
        results.append((loss, kept, recipes,
                        {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, kept_a, _, grads_a), (loss_b, kept_b, recipes, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    # per token and layer, two norm outputs of the hidden width and one product of the MLP's
    # width are no longer kept (the last norm's output feeds a head the loss keeps no input of
    # when it does not train; full fine-tuning trains it)
    per_layer = (2 * config.hidden_size + config.intermediate_size) * 4 * ids.numel()
    last_norm = config.hidden_size * 4 * ids.numel() if method == "full" else 0
    assert kept_a - kept_b == config.num_hidden_layers * per_layer + last_norm
    assert recipes > 0


def test_an_input_changed_in_place_is_refused():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    with recomputing_cheap_outputs():
        inner = x * 2
        doubled = inner * 3
        tag(doubled, lambda t: t * 3, inner)
        out = doubled @ w
    with torch.no_grad():
        inner.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_what_a_forward_notes_keeps_no_input_alive():
    """In a checkpointed layer nothing keeps a norm's input once the layer is done with it; noting
    the tagged outputs for the forward must not keep it either."""
    import weakref

    x = torch.randn(4, 8, requires_grad=True)
    with recomputing_cheap_outputs():
        inner = x * 2
        doubled = inner * 3
        tag(doubled, lambda t: t * 3, inner)
        gone = weakref.ref(inner)
        del inner, doubled
        assert gone() is None


def test_an_output_changed_in_place_before_it_is_saved_is_kept_as_it_is():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    expected = None
    for recomputing in (False, True):
        x.grad = w.grad = None
        with recomputing_cheap_outputs() if recomputing else contextlib.nullcontext():
            doubled = x * 2
            tag(doubled, lambda t: t * 2, x)
            doubled.add_(1)
            (doubled @ w).sum().backward()
        if expected is None:
            expected = w.grad.clone()
    assert torch.equal(w.grad, expected)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_under_autocast_the_copies_of_norm_outputs_are_made_again_too(tiny_model_dir, method):
    """Autocast hands each linear layer a bf16 copy of its input, and that copy is what the layer
    keeps: one per layer reading a norm's output (q, k, v; gate, up). Those copies, and the MLP's
    product (bf16 already), are made again: the same loss and gradients, bit for bit."""
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain, lean = build(tiny_model_dir, method), build(tiny_model_dir, method)
    tag_norm_outputs(lean)
    assert pass_half_inputs_as_they_are(lean) == (7 * plain.config.num_hidden_layers if method == "lora" else 0)
    results = []
    for model, recomputing in ((plain, False), (lean, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, kept, recipes = kept_and_recipes(model, batch, recomputing)
        loss.backward()
        results.append((loss, kept, recipes, [p.grad for p in model.parameters() if p.requires_grad]))
    (loss_a, kept_a, _, grads_a), (loss_b, kept_b, recipes, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    config, h, tokens = plain.config, plain.config.hidden_size, ids.numel()
    if method == "full":
        # in bf16, per token and layer: five copies of the hidden width and the product (the head
        # keeps a copy of a slice of the last norm's output, known by no node of its own, so it
        # stays; lmtune's chunked head keeps the output itself)
        less = config.num_hidden_layers * (5 * h + config.intermediate_size)
    else:
        # peft's round trip through fp32 also made copies of the attention's output and the
        # product; in the first layer nothing before q, k and v trains, so their copies have no
        # autograd node to be known by, and stay
        less = config.num_hidden_layers * (6 * h + config.intermediate_size) - 3 * h
    assert kept_a - kept_b == less * 2 * tokens
    assert recipes > 0
