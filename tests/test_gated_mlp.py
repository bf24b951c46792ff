"""The gated MLP that keeps gate and up only: the same values and gradients as transformers' own
forward, bit for bit, on a real model with LoRA, and less kept for backward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmtune.models.gated_mlp import SiluTimesUp, is_silu_gated_mlp, keep_less_in_gated_mlps
from tests.conftest import method_model


def test_silu_times_up_matches_autograd_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(5, 7, 12, generator=g, requires_grad=True)
    up = torch.randn(5, 7, 12, generator=g, requires_grad=True)
    upstream = torch.randn(5, 7, 12, generator=g)
    plain = torch.nn.functional.silu(gate) * up
    (plain * upstream).sum().backward()
    expected = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    fused = SiluTimesUp.apply(gate, up)
    (fused * upstream).sum().backward()
    assert torch.equal(fused, plain)
    assert torch.equal(gate.grad, expected[0]) and torch.equal(up.grad, expected[1])


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    sizes: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**batch).loss
    return loss, sum(sizes.values())


def test_a_lora_model_trains_the_same_numbers_and_keeps_less(tiny_model_dir):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain, fused = method_model(tiny_model_dir), method_model(tiny_model_dir)
    assert keep_less_in_gated_mlps(fused) == plain.config.num_hidden_layers
    results = []
    for model in (plain, fused):
        loss, kept = saved_bytes(model, batch)
        loss.backward()
        results.append((loss, kept, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, kept_a, grads_a), (loss_b, kept_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    width = plain.config.intermediate_size
    # one fp32 tensor of the MLP's width per token and layer less
    assert kept_a - kept_b == plain.config.num_hidden_layers * ids.numel() * width * 4


def test_only_llama_style_silu_mlps_are_changed(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert is_silu_gated_mlp(model.model.layers[0].mlp)
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert not is_silu_gated_mlp(model.model.layers[0].mlp)
    assert not is_silu_gated_mlp(model.model.layers[0].self_attn)
