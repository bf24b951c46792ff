"""Every layer takes one additive attention mask made once per forward: the same loss and
gradients as torch making it in each layer, bit for bit, with one mask kept for backward instead of
one per layer (padded rows, packed rows, fp32 and bf16 autocast)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from lmtune.data.batching import _join, collate, model_inputs
from lmtune.data.encode import EncodedRow
from lmtune.models.shared_mask import additive_mask, share_attention_masks
from tests.conftest import method_model


def padded_batch() -> dict:
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 49152, (n,), generator=generator).tolist() for n in (19, 12, 7)]
    return collate([EncodedRow(r, r) for r in rows], pad_id=0)


def packed_batch() -> dict:
    generator = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, 49152, (n,), generator=generator).tolist() for n in (9, 6, 11)]
    return collate([_join([EncodedRow(r, r) for r in rows[:2]]), _join([EncodedRow(rows[2], rows[2])])],
                   pad_id=0)


def kept_bytes_loss_and_grads(model: torch.nn.Module, batch: dict, autocast: bool):
    """The bytes autograd keeps for backward (weights aside), the loss and the gradients."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with precision, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**model_inputs(batch), labels=batch["labels"]).loss
    loss.backward()
    return sum(kept.values()), loss, [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_same_numbers_with_one_mask_kept(tiny_model_dir, make_batch, autocast):
    batch = make_batch()
    plain, shared = method_model(tiny_model_dir), method_model(tiny_model_dir)
    layers = plain.config.num_hidden_layers
    assert share_attention_masks(shared) == layers
    kept_a, loss_a, grads_a = kept_bytes_loss_and_grads(plain, batch, autocast)
    kept_b, loss_b, grads_b = kept_bytes_loss_and_grads(shared, batch, autocast)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    rows, width = batch["input_ids"].shape
    mask_bytes = rows * width * width * (2 if autocast else 4)
    assert kept_a - kept_b == (layers - 1) * mask_bytes


def test_the_shared_mask_lives_no_longer_than_its_users():
    mask = torch.tril(torch.ones(1, 1, 5, 5, dtype=torch.bool))
    made = additive_mask(mask, torch.float32)
    assert additive_mask(mask, torch.float32) is made
    assert torch.equal(made, torch.zeros(1, 1, 5, 5).masked_fill(~mask, float("-inf")))
    assert additive_mask(mask, torch.bfloat16).dtype == torch.bfloat16
    assert additive_mask(mask.clone(), torch.float32) is not made  # another mask, another tensor
    alive = torch.utils.weak.WeakTensorKeyDictionary()
    alive[made] = True
    del made
    gc.collect()
    assert len(alive) == 0


def test_other_attention_implementations_are_left_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert share_attention_masks(eager) == 0
