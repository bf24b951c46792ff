"""Gradient checkpointing recomputes activations, so it must not change a number: the first step's
loss and gradient norm are those of the run that keeps every activation, whether every decoder
layer is recomputed or only every n-th one (checkpoint_every_n_layers)."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import ConfigError
from lmtune.models.load import load_model
from lmtune.models.methods import apply_method
from lmtune.train.engine import enable_gradient_checkpointing
from lmtune.train.forward import token_loss_sum
from lmtune.train.logs import read_log
from tests.conftest import write_yaml


def test_every_n_layers_checkpoints_the_first_of_each_n(tiny_model_dir):
    cfg = build_config({"finetuning_type": "lora", "lora_rank": 4})
    model = apply_method(load_model(tiny_model_dir), cfg)
    enable_gradient_checkpointing(model, every_n_layers=2)
    flags = [m.gradient_checkpointing for m in model.modules()
             if isinstance(m, GradientCheckpointingLayer)]
    assert flags == [True, False]  # the tiny model's two decoder layers


def test_checkpointed_steps_train_the_same_numbers(tmp_path, train_config):
    first = {}
    for name, keys in (("none", {}), ("every layer", {"gradient_checkpointing": True}),
                       ("every 2nd", {"gradient_checkpointing": True, "checkpoint_every_n_layers": 2})):
        out = tmp_path / name.replace(" ", "-")
        config = train_config | keys | {"output_dir": str(out), "max_steps": 1}
        assert main(["train", str(write_yaml(tmp_path / f"{out.name}.yaml", config))]) == 0
        first[name] = read_log(out / "trainer_log.jsonl")[0]
    for name in ("every layer", "every 2nd"):
        assert first[name]["loss"] == pytest.approx(first["none"]["loss"], rel=1e-6)
        assert first[name]["grad_norm"] == pytest.approx(first["none"]["grad_norm"], rel=1e-5)


def test_recomputed_layers_give_the_same_gradients(tiny_model_dir):
    """The gradient of every LoRA weight, not only their norm."""
    cfg = build_config({"finetuning_type": "lora", "lora_rank": 4})
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    grads = []
    for every in (None, 1, 2):
        torch.manual_seed(0)
        model = apply_method(load_model(tiny_model_dir), cfg)
        if every is not None:
            enable_gradient_checkpointing(model, every)
        model.train()
        token_loss_sum(model, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[2], grads[0], rtol=1e-5, atol=1e-7)


def test_every_n_layers_without_checkpointing_is_refused():
    with pytest.raises(ConfigError) as info:
        build_config({"checkpoint_every_n_layers": 2})
    assert info.value.message == ("checkpoint_every_n_layers applies only with gradient_checkpointing: "
                                  "true, so it would be ignored here.")
    assert info.value.fix == "set gradient_checkpointing: true or remove checkpoint_every_n_layers."
