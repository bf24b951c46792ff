"""ppo's loop is built from the engine's pieces, so every guard of the shared loop holds there too:
no non-finite weights saved, fp16 refused on a CPU, gradient checkpointing applied, the method's
hooks run (PiSSA saved as plain LoRA), and evaluation on its own cadence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmtune.cli import main
from lmtune.train import engine, ppo
from lmtune.train.logs import read_log
from tests.conftest import write_yaml


@pytest.fixture
def ppo_run(ppo_config) -> dict:
    """ppo_config made as short as these checks allow: 12 prompts, 2 iterations of 4."""
    return ppo_config | {"lora_rank": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                         "max_steps": 2, "max_new_tokens": 4, "val_size": 12}


def run(tmp_path: Path, config: dict) -> int:
    return main(["train", str(write_yaml(tmp_path / "ppo.yaml", config))])


@pytest.fixture
def trainers(monkeypatch) -> list:
    """The Trainer each ppo run builds, to reach its model from the test."""
    made = []

    def spy(*args, **kwargs):
        made.append(engine.prepare_trainer(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr("lmtune.train.ppo.prepare_trainer", spy)
    return made


def test_ppo_stops_on_a_non_finite_gradient(tmp_path, ppo_run, trainers, monkeypatch, capsys):
    real_sampler = ppo.Sampler

    def sampler_with_nan_value_gradients(trainer, *args):
        # A finite loss whose gradient is NaN: only the gradient check can catch it.
        trainer.unwrapped.head.weight.register_hook(lambda grad: grad * float("nan"))
        return real_sampler(trainer, *args)

    monkeypatch.setattr("lmtune.train.ppo.Sampler", sampler_with_nan_value_gradients)
    assert run(tmp_path, ppo_run) == 2
    err = capsys.readouterr().err
    assert "iteration 1: the gradient norm is nan" in err
    assert not (Path(ppo_run["output_dir"]) / "adapter_model.safetensors").exists()


def test_ppo_never_saves_non_finite_weights(tmp_path, ppo_run, monkeypatch, capsys):
    real_update = ppo.train_on_rollouts

    def update_then_corrupt(trainer, *args):
        out = real_update(trainer, *args)
        with torch.no_grad():
            trainer.unwrapped.head.weight.fill_(float("inf"))
        return out

    monkeypatch.setattr("lmtune.train.ppo.train_on_rollouts", update_then_corrupt)
    assert run(tmp_path, ppo_run | {"max_steps": 1, "val_size": 0}) == 2
    err = capsys.readouterr().err
    assert "holds NaN/inf; nothing was saved" in err
    out = Path(ppo_run["output_dir"])
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "value_head.safetensors").exists()


def test_ppo_refuses_fp16_on_the_cpu(tmp_path, ppo_run, capsys):
    assert run(tmp_path, ppo_run | {"fp16": True}) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err


def test_ppo_applies_gradient_checkpointing(tmp_path, ppo_run, trainers):
    assert run(tmp_path, ppo_run | {"gradient_checkpointing": True, "max_steps": 1}) == 0
    assert trainers[0].unwrapped.lm.get_base_model().is_gradient_checkpointing


def test_ppo_saves_a_pissa_policy_as_plain_lora_against_the_starting_model(tmp_path, ppo_run):
    assert run(tmp_path, ppo_run | {"pissa_init": True, "pissa_iter": -1}) == 0
    out = Path(ppo_run["output_dir"])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 * ppo_run["lora_rank"]  # converted: trained minus initial factors
    assert not (out / "pissa_init").exists()
    # The reference is the starting policy (not the residual base left by switching PiSSA off),
    # so the first rollout's KL is zero.
    first = next(r for r in read_log(out / "trainer_log.jsonl") if r["step"] == 1)
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("cadence,expected", [
    ({"eval_strategy": "steps", "eval_steps": 1, "logging_steps": 2}, [0, 1, 2, 3]),
    # 12 train prompts in batches of 4: 3 iterations per epoch, so epoch 1 ends at iteration 3.
    ({"eval_strategy": "epoch", "logging_steps": 10}, [0, 3]),
])
def test_ppo_evaluates_on_its_own_cadence(tmp_path, ppo_run, cadence, expected):
    assert run(tmp_path, ppo_run | {"max_steps": 3} | cadence) == 0
    records = read_log(Path(ppo_run["output_dir"]) / "trainer_log.jsonl")
    assert [r["step"] for r in records if "eval_reward" in r] == expected
