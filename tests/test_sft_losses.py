"""sft's token-loss rules (DFT, EAFT, ASFT) against hand computations, summed so the loop's
normalisation by the window's target tokens stays exact; and NEFTune's noise, on in training only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lmtune.config import build_config
from lmtune.data.batching import collate
from lmtune.data.encode import IGNORE_INDEX
from lmtune.errors import ConfigError
from lmtune.models.methods import apply_method
from lmtune.train.engine import add_neftune_noise
from lmtune.train.forward import count_targets
from lmtune.train.losses import asft_token_losses, dft_token_losses, eaft_token_losses
from lmtune.train.sft import sft_objective, token_objective
from tests.conftest import train

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [5.0, -5.0, 0.0, 1.0]])
LABELS = torch.tensor([0, 3, 1])


def test_dft_weights_each_token_by_its_detached_probability():
    logits = LOGITS.clone().requires_grad_(True)
    losses = dft_token_losses(logits, LABELS)
    p = torch.softmax(LOGITS, -1)[torch.arange(3), LABELS]
    torch.testing.assert_close(losses, -torch.log(p) * p)
    losses.sum().backward()
    # The weight is a constant: the gradient is p times the cross-entropy's (softmax - one-hot).
    expected = p[:, None] * (torch.softmax(LOGITS, -1) - F.one_hot(LABELS, 4))
    torch.testing.assert_close(logits.grad, expected)


def test_eaft_weights_by_the_top20_entropy():
    logits = torch.zeros(2, 30)
    logits[1, :20] = 3.0  # the top 20 are equal: their entropy is log 20
    labels = torch.tensor([4, 25])
    losses = eaft_token_losses(logits, labels, alpha=2.0)
    nll = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(losses, nll * (math.log(20) / 3) ** 2)


def test_asft_is_dft_plus_alpha_kl_to_the_reference():
    ref = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [5.0, -5.0, 0.0, 1.0]])
    losses = asft_token_losses(LOGITS, LABELS, ref, alpha=0.5)
    q, p = torch.softmax(ref, -1), torch.softmax(LOGITS, -1)
    kl = (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(losses, dft_token_losses(LOGITS, LABELS) + 0.5 * kl)
    assert kl[2].abs() < 1e-6  # same distribution as the reference: DFT alone


def _model_and_batch(tiny_model_dir, tokenizer, keys):
    cfg = build_config({"model_name_or_path": tiny_model_dir, "lora_rank": 4} | keys)
    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # an adapter that moved away from the base
    rows = []
    for text, reply in (("Say hi.", "Hi there!"), ("Count to three, please.", "One, two, three.")):
        prompt = tokenizer(text)["input_ids"]
        answer = tokenizer(reply)["input_ids"] + [2]
        rows.append({"input_ids": prompt + answer,
                     "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return cfg, model, rows


@pytest.mark.parametrize("keys", [{"use_dft_loss": True}, {"use_eaft_loss": True, "eaft_alpha": 5.0},
                                  {"use_asft_loss": True, "asft_alpha": 0.3}],
                         ids=["dft", "eaft", "asft"])
def test_rules_sum_over_tokens_so_window_normalisation_holds(tiny_model_dir, tokenizer, keys):
    from lmtune.data.encode import EncodedRow

    cfg, model, raw = _model_and_batch(tiny_model_dir, tokenizer, keys)
    rows = [EncodedRow(r["input_ids"], r["labels"]) for r in raw]
    objective = sft_objective(cfg, model)
    model.train()
    both = collate(rows, 2)
    apart = [collate([row], 2) for row in rows]
    loss_both = objective.loss(model, both)[0]
    loss_apart = sum(objective.loss(model, b)[0] for b in apart)
    # The sum over a padded batch is the sum of its rows: accumulation x 1 == 1 x accumulation.
    torch.testing.assert_close(loss_both, loss_apart, atol=1e-4, rtol=1e-5)
    assert objective.units(both) == sum(count_targets(b) for b in apart)
    plain = token_objective(cfg).loss(model, both)[0]
    assert 0 < loss_both.item() and not math.isclose(loss_both.item(), plain.item(), rel_tol=1e-3)
    if "use_asft_loss" in keys:  # the reference is the base: the adapter is switched off for it
        dft = sft_objective(build_config({"use_dft_loss": True, "lora_rank": 4}), model)
        assert loss_both.item() > dft.loss(model, both)[0].item()


def test_dft_run_trains_and_its_loss_is_the_weighted_one(tmp_path, train_config):
    plain = train(tmp_path, train_config)
    config = train_config | {"use_dft_loss": True, "output_dir": str(tmp_path / "dft")}
    dft = train(tmp_path, config)
    # Every token's weight is its probability, below 1: the weighted mean is the smaller.
    assert 0 < dft["train_loss"] < plain["train_loss"]
    assert (Path(config["output_dir"]) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("keys, words", [
    ({"use_dft_loss": True, "use_eaft_loss": True}, ["use_dft_loss and use_eaft_loss", "keep one"]),
    ({"use_dft_loss": True, "stage": "dpo"}, ["use_dft_loss", "stage dpo"]),
    ({"eaft_alpha": 2.0}, ["eaft_alpha", "use_eaft_loss: true"]),
    ({"asft_alpha": 0.2}, ["asft_alpha", "use_asft_loss: true"]),
    ({"use_asft_loss": True, "finetuning_type": "prompt"}, ["use_asft_loss", "prompt"]),
    ({"neftune_noise_alpha": 5, "finetuning_type": "prefix"}, ["neftune_noise_alpha", "prefix"]),
    ({"neftune_noise_alpha": 0}, ["neftune_noise_alpha"]),
])
def test_loss_keys_that_cannot_apply_are_refused(keys, words):
    with pytest.raises(ConfigError) as info:
        build_config(keys)
    text = str(info.value)
    assert all(word in text for word in words), text


# --- NEFTune ------------------------------------------------------------------------------------

def test_neftune_noise_in_training_only(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 9690, 198, 33, 42, 2, 198, 1]])
    clean = model.get_input_embeddings()(ids).detach()
    add_neftune_noise(model, alpha=5.0)
    embed = model.get_input_embeddings()

    model.train()
    noisy = [embed(ids).detach() for _ in range(2)]
    bound = 5.0 / math.sqrt(ids.shape[1] * clean.shape[-1])
    for sample in noisy:
        noise = sample - clean
        assert noise.abs().max() <= bound + 1e-6 and noise.abs().max() > 0.9 * bound
        assert noise.abs().mean() == pytest.approx(bound / 2, rel=0.1)  # uniform on [-m, m]
    assert not torch.equal(noisy[0], noisy[1])  # fresh noise every forward

    model.eval()
    assert torch.equal(embed(ids), clean)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = fresh.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert torch.equal(out, expected)


def test_neftune_run_differs_from_a_clean_one_and_evaluates_clean(tmp_path, train_config):
    base = train_config | {"val_size": 2, "eval_strategy": "steps", "eval_steps": 100}
    clean = train(tmp_path, base)
    noisy = train(tmp_path, base | {"neftune_noise_alpha": 5.0, "output_dir": str(tmp_path / "n")})
    assert noisy["train_loss"] != clean["train_loss"]
    # Before the first update both models are the same; NEFTune must not touch the eval pass.
    assert noisy["eval_loss_start"] == clean["eval_loss_start"]


def test_asft_reference_of_a_full_fine_tune_is_the_model_before_training(tiny_model_dir, tokenizer):
    from lmtune.data.encode import EncodedRow

    _, _, raw = _model_and_batch(tiny_model_dir, tokenizer, {})
    cfg = build_config({"finetuning_type": "full", "use_asft_loss": True})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate([EncodedRow(r["input_ids"], r["labels"]) for r in raw], 2)
    asft = sft_objective(cfg, model)
    dft = sft_objective(build_config({"finetuning_type": "full", "use_dft_loss": True}), model)
    torch.testing.assert_close(asft.loss(model, batch)[0], dft.loss(model, batch)[0])  # KL 0
    with torch.no_grad():  # as an update would, in place: the reference must keep the old weights
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    assert asft.loss(model, batch)[0].item() > dft.loss(model, batch)[0].item() + 1e-4
