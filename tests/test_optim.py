"""Optimizers by HF Trainer's names, Muon beside AdamW, and pure bf16: each builds what its name
says, trains a real model, and resumes from a checkpoint exactly; other names are refused."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler
from transformers.optimization import Adafactor

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.config.rules import OPTIMIZERS
from lmtune.errors import ConfigError
from lmtune.models.methods import apply_method
from lmtune.train.checkpoint import COMPLETE_MARKER
from lmtune.train.fingerprint import changed_keys
from lmtune.train.optim import MuonWithAdamW, build_optimizer, state_bytes
from tests.conftest import train, write_yaml

IDS = torch.tensor([[1, 9690, 198, 33, 42, 2, 198, 1, 4093, 2]])

# optim -> (optimizer class, dtype of its first moment state: how the name is honoured)
EXPECTED = {
    "adamw_torch": (torch.optim.AdamW, "exp_avg", torch.float32),
    "adamw_torch_fused": (torch.optim.AdamW, "exp_avg", torch.float32),
    "adafactor": (Adafactor, "exp_avg_sq_row", torch.float32),  # factored second moment
    "sgd": (torch.optim.SGD, None, None),
    "adagrad": (torch.optim.Adagrad, "sum", torch.float32),
    "rmsprop": (torch.optim.RMSprop, "square_avg", torch.float32),
    "adamw_bnb_8bit": (bnb.optim.AdamW, "state1", torch.uint8),
    "adamw_8bit": (bnb.optim.AdamW, "state1", torch.uint8),
    "paged_adamw_8bit": (bnb.optim.AdamW, "state1", torch.uint8),
    "paged_adamw_32bit": (bnb.optim.AdamW, "state1", torch.float32),
}


def _built(tiny_model_dir, keys: dict):
    """The config, the tiny model with its method applied (full fine-tuning unless keys say
    otherwise) and the run's optimizer over it."""
    cfg = build_config({"model_name_or_path": tiny_model_dir, "finetuning_type": "full",
                        "learning_rate": 1e-2} | keys)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    return cfg, model, build_optimizer(model, cfg)


def _steps(model, optimizer, n: int = 3) -> list[float]:
    losses = []
    model.train()
    for _ in range(n):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_every_supported_name_is_tested():
    assert set(EXPECTED) == set(OPTIMIZERS)


@pytest.mark.parametrize("optim", list(EXPECTED))
def test_optimizer_is_the_named_one_and_trains(tiny_model_dir, optim):
    cls, state_key, dtype = EXPECTED[optim]
    # Full fine-tuning: 8-bit states apply to large matrices (bitsandbytes keeps small ones in
    # 32 bits), and the embedding is one.
    _, model, optimizer = _built(tiny_model_dir, {"optim": optim, "weight_decay": 0.01})
    assert isinstance(optimizer, cls)
    if optim == "adamw_torch_fused":
        assert optimizer.defaults["fused"]
    before = model.model.embed_tokens.weight.detach().clone()
    losses = _steps(model, optimizer)
    assert losses[-1] < losses[0]
    assert not torch.equal(model.model.embed_tokens.weight, before)
    if state_key:
        assert optimizer.state[model.model.embed_tokens.weight][state_key].dtype == dtype
    # Norm weights are not decayed, matrices are (every optimizer gets HF Trainer's groups).
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.model.norm.weight)] == 0.0
    assert decay[id(model.model.embed_tokens.weight)] == 0.01


@pytest.mark.parametrize("keys, words", [
    ({"optim": "adamw_torch_xla"}, ["adamw_torch_xla", "TPU", "adamw_torch, adamw_torch_fused"]),
    ({"optim": "lion_8bit"}, ["lion_8bit", "does not include", "paged_adamw_32bit"]),
    ({"optim": "adam"}, ["optim: adam", "use one of: adamw_torch"]),
    ({"use_muon": True, "optim": "sgd"}, ["use_muon", "optim: sgd"]),
    ({"use_muon": True, "loraplus_lr_ratio": 16}, ["use_muon", "loraplus_lr_ratio"]),
    ({"use_adam_mini": True}, ["use_adam_mini", "finetuning_type: lora", "full or freeze"]),
    ({"use_adam_mini": True, "use_muon": True, "finetuning_type": "full"},
     ["use_muon and use_adam_mini"]),
    ({"use_galore": True}, ["use_galore", "finetuning_type: lora", "full or freeze"]),
    ({"use_galore": True, "finetuning_type": "full", "optim": "sgd"},
     ["use_galore", "optim: sgd", "adamw_torch"]),
    ({"use_apollo": True, "finetuning_type": "full", "optim": "adafactor"},
     ["use_apollo", "optim: adafactor"]),
    ({"use_apollo": True, "use_galore": True, "finetuning_type": "full"},
     ["use_galore and use_apollo"]),
    ({"use_galore": True, "finetuning_type": "full", "fsdp": "full_shard"}, ["use_galore", "fsdp"]),
    ({"galore_layerwise": True, "finetuning_type": "full"}, ["galore_layerwise", "use_galore: true"]),
    ({"use_galore": True, "galore_layerwise": True, "finetuning_type": "full",
      "gradient_accumulation_steps": 2}, ["galore_layerwise", "gradient_accumulation_steps: 1"]),
    ({"use_apollo": True, "apollo_layerwise": True, "finetuning_type": "full", "stage": "ppo",
      "reward_model": "m:f"}, ["apollo_layerwise", "stage ppo"]),
    ({"use_badam": True}, ["use_badam", "finetuning_type: lora", "full"]),
    ({"use_badam": True, "finetuning_type": "full", "badam_mode": "ratio"},
     ["badam_mode", "ratio", "layer"]),
    ({"use_badam": True, "finetuning_type": "full", "use_muon": True}, ["use_badam and use_muon"]),
    ({"pure_bf16": True, "fp16": True}, ["pure_bf16", "fp16"]),
    ({"pure_bf16": True, "quantization_bit": 4}, ["pure_bf16", "quantization_bit: 4"]),
])
def test_optimizer_keys_that_cannot_work_are_refused(keys, words):
    with pytest.raises(ConfigError) as info:
        build_config(keys)
    text = str(info.value)
    assert all(word in text for word in words), text


def test_a_changed_optimizer_is_another_run_on_resume():
    saved = build_config({}).to_yaml_dict()
    for keys in ({"optim": "adafactor"}, {"use_muon": True}, {"pure_bf16": True},
                 {"neftune_noise_alpha": 5.0}, {"use_dft_loss": True}):
        assert changed_keys(saved, build_config(keys).to_yaml_dict()) == sorted(keys)


# --- GaLore and APOLLO ---------------------------------------------------------------------------

@pytest.mark.parametrize("keys, cls_name", [
    ({"use_galore": True}, "galore_torch.adamw.AdamW"),
    ({"use_galore": True, "optim": "adafactor"}, "galore_torch.adafactor.Adafactor"),
    ({"use_apollo": True}, "apollo_torch.apollo.AdamW"),
    ({"use_apollo": True, "apollo_proj": "svd", "apollo_scale_type": "tensor"},
     "apollo_torch.apollo.AdamW"),
], ids=["galore", "galore_adafactor", "apollo", "apollo_mini_svd"])
def test_projected_optimizers_keep_low_rank_state_for_linear_weights(tiny_model_dir, keys,
                                                                    cls_name):
    cfg, model, optimizer = _built(tiny_model_dir, {"galore_rank": 4, "apollo_rank": 4,
                                                    "galore_target": "q_proj,v_proj"} | keys)
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == cls_name
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1 and projected[0]["rank"] == 4
    name_of = {id(p): n for n, p in model.named_parameters()}
    in_projection = {name_of[id(p)] for p in projected[0]["params"]}
    layer = model.model.layers[0]
    if cfg.use_galore:
        assert in_projection == {n for n in name_of.values() if n.endswith(("q_proj.weight",
                                                                            "v_proj.weight"))}
    else:  # apollo_target all: every linear layer but the output head
        assert "model.layers.0.mlp.down_proj.weight" in in_projection
        assert not any("lm_head" in n or "embed" in n for n in in_projection)
    losses = _steps(model, optimizer)
    assert losses[-1] < losses[0]
    q = layer.self_attn.q_proj.weight
    if "exp_avg" in optimizer.state[q]:  # the moments live in the projected space
        assert 4 in optimizer.state[q]["exp_avg"].shape and optimizer.state[q]["exp_avg"].numel() < q.numel()
    # The checkpointed state holds no Python object: it reads back with weights_only.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert any(isinstance(s.get("projector"), dict) for s in saved["state"].values())
    assert not isinstance(optimizer.state[q]["projector"], dict)  # the live state is untouched


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_layerwise_steps_each_weight_in_backward_as_the_whole_optimizer_would(tiny_model_dir, name):
    """Per-weight optimizers stepped inside the backward pass make the very updates of the one
    optimizer stepped after it (no clipping in either), while each gradient is freed at once."""
    keys = {f"use_{name}": True, f"{name}_rank": 4, f"{name}_update_interval": 2, "max_grad_norm": 0}
    torch.manual_seed(0)
    _, whole, optimizer = _built(tiny_model_dir, keys)
    torch.manual_seed(0)
    _, layerwise, per_weight = _built(tiny_model_dir, keys | {f"{name}_layerwise": True})
    assert len(per_weight.parts) == sum(p.requires_grad for p in layerwise.parameters())
    layerwise.train()
    for _ in range(3):  # across a recomputed projection (every 2 steps)
        expected = _steps(whole, optimizer, n=1)
        loss = layerwise(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert all(p.grad is None for p in layerwise.parameters())  # used and freed in backward
        assert per_weight.grad_norm() > 0
        per_weight.step()
        assert loss.item() == pytest.approx(expected[0], abs=1e-5)
    for (n, a), b in zip(whole.named_parameters(), layerwise.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)
    # A second backward before the step would add to weights already moved: stopped, not summed.
    layerwise(input_ids=IDS, labels=IDS).loss.backward()
    with pytest.raises(RuntimeError, match="second backward"):
        layerwise(input_ids=IDS, labels=IDS).loss.backward()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_galore_8bit_is_refused_without_cuda(tiny_model_dir):
    with pytest.raises(ConfigError) as info:
        _built(tiny_model_dir, {"use_galore": True, "optim": "adamw_8bit"})
    assert "GPU" in info.value.message and "adamw_torch" in info.value.fix


def test_badam_trains_one_layer_at_a_time(tiny_model_dir):
    _, model, optimizer = _built(tiny_model_dir, {"use_badam": True, "badam_switch_interval": 2})
    layers = model.model.layers

    def snapshot():
        return [layer.mlp.down_proj.weight.detach().clone() for layer in layers] + [
            model.model.embed_tokens.weight.detach().clone()]

    # BAdam counts its first switch from step 0: layer 0 trains one step, then each layer two.
    start = snapshot()
    losses = _steps(model, optimizer, 1)
    after_one = snapshot()
    assert not torch.equal(after_one[0], start[0]) and torch.equal(after_one[1], start[1])
    losses += _steps(model, optimizer, 2)  # switched (ascending): the second layer
    after_three = snapshot()
    assert torch.equal(after_three[0], after_one[0]) and not torch.equal(after_three[1], after_one[1])
    assert torch.equal(after_three[2], start[2])  # embeddings and head are not BAdam's blocks
    assert losses[-1] < losses[0]
    # ... and after its two steps, back to the first layer.
    assert optimizer.state_dict()["active_block"] == 0 and optimizer.state_dict()["global_step"] == 3


# --- Muon ---------------------------------------------------------------------------------------

def test_muon_takes_hidden_matrices_and_adamw_the_rest(tiny_model_dir):
    _, model, optimizer = _built(tiny_model_dir, {"use_muon": True})
    assert isinstance(optimizer, MuonWithAdamW)
    muon, adamw = optimizer.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    name_of = {id(p): n for n, p in model.named_parameters()}
    in_muon = {name_of[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {name_of[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n}
    assert "model.embed_tokens.weight" in in_adamw and "model.norm.weight" in in_adamw
    # The schedule drives both parts through the shared groups.
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=4)
    losses = _steps(model, optimizer, 1)
    scheduler.step()
    assert {g["lr"] for part in optimizer.parts for g in part.param_groups} == {0.75e-2}
    losses += _steps(model, optimizer, 2)
    assert losses[-1] < losses[0]
    assert "momentum_buffer" in muon.state[model.model.layers[0].self_attn.q_proj.weight]


def test_muon_without_hidden_matrices_is_refused(tiny_model_dir):
    cfg = build_config({"model_name_or_path": tiny_model_dir, "finetuning_type": "ia3",
                        "use_muon": True})
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    with pytest.raises(ConfigError) as info:
        build_optimizer(model, cfg)
    assert "use_muon" in info.value.message and "ia3" in info.value.message


# --- resume -------------------------------------------------------------------------------------

def log_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "trainer_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("keys", [{"optim": "adamw_8bit", "finetuning_type": "full"},
                                  {"optim": "adafactor"},
                                  {"use_muon": True, "finetuning_type": "full"},
                                  {"pure_bf16": True, "finetuning_type": "full"},
                                  {"use_adam_mini": True, "finetuning_type": "full"},
                                  # A projection recomputed at step 3: the resumed run must go on
                                  # with the saved one at step 2 and recompute the same at 3.
                                  {"use_galore": True, "finetuning_type": "full", "galore_rank": 4,
                                   "galore_update_interval": 3},
                                  {"use_apollo": True, "finetuning_type": "full", "apollo_rank": 4,
                                   "apollo_update_interval": 3},
                                  {"use_galore": True, "galore_layerwise": True,
                                   "finetuning_type": "full", "galore_rank": 4,
                                   "galore_update_interval": 3},
                                  # The next layer at step 3: the resumed run must know the step
                                  # count and the layer in training.
                                  {"use_badam": True, "finetuning_type": "full",
                                   "badam_switch_interval": 3},
                                  {"use_badam": True, "finetuning_type": "full",
                                   "badam_switch_mode": "random", "badam_switch_interval": 1}],
                         ids=["adamw_8bit", "adafactor", "muon", "pure_bf16", "adam_mini",
                              "galore", "apollo", "galore_layerwise", "badam", "badam_random"])
def test_resume_restores_the_optimizer_state(tmp_path, train_config, keys):
    config = {k: v for k, v in train_config.items() if k != "lora_rank" or "finetuning_type" not in keys} \
        | keys | {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-2}
    train(tmp_path, config)
    full_run = Path(config["output_dir"])
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(full_run / "checkpoint-2", resumed_dir / "checkpoint-2")
    assert (resumed_dir / "checkpoint-2" / COMPLETE_MARKER).is_file()
    (resumed_dir / "trainer_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in log_of(full_run) if r["step"] <= 2))
    train(tmp_path, config | {"output_dir": str(resumed_dir), "resume_from_checkpoint": "auto"})
    assert [r["loss"] for r in log_of(resumed_dir)] == [r["loss"] for r in log_of(full_run)]
    weights = "model.safetensors" if keys.get("finetuning_type") == "full" else "adapter_model.safetensors"
    a, b = load_file(full_run / weights), load_file(resumed_dir / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_the_optimizer_state_would_differ(tmp_path, train_config):
    # The guard for the test above: starting the 8-bit states afresh at step 2 changes the run.
    config = {k: v for k, v in train_config.items() if k != "lora_rank"} | {
        "optim": "adamw_8bit", "finetuning_type": "full", "max_steps": 4, "save_steps": 2,
        "learning_rate": 1e-2}
    train(tmp_path, config)
    full_run = Path(config["output_dir"])
    optimizer_file = full_run / "checkpoint-2" / "optimizer.pt"
    state = torch.load(optimizer_file, weights_only=True)
    # bitsandbytes saves its 8-bit moments under one key per parameter.
    held = [v["__bnb_optimizer_quant_state__"]["state1"] for v in state["state"].values()]
    assert any(t.dtype == torch.uint8 for t in held)
    state["state"] = {}
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full_run / "checkpoint-2", resumed_dir / "checkpoint-2")
    torch.save(state, resumed_dir / "checkpoint-2" / "optimizer.pt")
    train(tmp_path, config | {"output_dir": str(resumed_dir), "resume_from_checkpoint": "auto"})
    assert log_of(resumed_dir)[-1]["loss"] != log_of(full_run)[-1]["loss"]


# --- pure bf16 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_pure_bf16_trains_weights_and_states_in_bf16(tmp_path, train_config, monkeypatch,
                                                     finetuning_type):
    import lmtune.train.engine as engine

    seen = {}
    real = engine.build_optimizer

    def spy(model, cfg):
        seen["optimizer"] = real(model, cfg)
        seen["model"] = model
        return seen["optimizer"]

    monkeypatch.setattr(engine, "build_optimizer", spy)
    config = {k: v for k, v in train_config.items() if finetuning_type == "lora" or k != "lora_rank"} \
        | {"finetuning_type": finetuning_type, "pure_bf16": True, "learning_rate": 1e-2}
    results = train(tmp_path, config)
    assert results["train_loss"] > 0
    model, optimizer = seen["model"], seen["optimizer"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(optimizer.state[p]["exp_avg"].dtype == torch.bfloat16 for p in trainable)
    losses = [r["loss"] for r in log_of(Path(config["output_dir"]))]
    assert losses[-1] < losses[0]
    weights = "model.safetensors" if finetuning_type == "full" else "adapter_model.safetensors"
    saved = load_file(Path(config["output_dir"]) / weights)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


def test_plan_accounts_for_the_optimizer(tmp_path, train_config, capsys):
    plans = {}
    # Full fine-tuning: the tiny model's states are large enough to show in GiB to 3 places.
    for name, keys in {"adamw": {}, "8bit": {"optim": "adamw_8bit"}, "sgd": {"optim": "sgd"},
                       "muon": {"use_muon": True}, "oft": {"finetuning_type": "oft"},
                       "bf16": {"pure_bf16": True}}.items():
        config = {k: v for k, v in train_config.items() if k != "lora_rank"} | {
            "finetuning_type": "full"} | keys
        assert main(["plan", str(write_yaml(tmp_path / f"{name}.yaml", config)), "--json"]) == 0
        plans[name] = json.loads(capsys.readouterr().out)["model"]
    memory = {name: plan["memory_gib"] for name, plan in plans.items()}
    assert memory["sgd"]["optimizer"] == 0
    assert 0 < memory["8bit"]["optimizer"] < memory["adamw"]["optimizer"]
    assert memory["muon"]["optimizer"] <= memory["adamw"]["optimizer"]
    assert memory["bf16"]["weights"] < memory["adamw"]["weights"]
    # OFT's default 32-wide blocks: 2 per 64-wide input, 4 for down_proj's 128, 496 values each.
    assert plans["oft"]["trainable_params"] == 2 * (6 * 2 + 4) * 496


def test_muon_state_is_one_momentum_for_matrices_and_two_moments_for_the_rest(tiny_model_dir):
    cfg = build_config({"model_name_or_path": tiny_model_dir, "finetuning_type": "full",
                        "use_muon": True})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = build_optimizer(model, cfg)
    _steps(model, optimizer, 1)
    held = sum(t.numel() * t.element_size() for part in optimizer.parts
               for state in part.state.values() for t in state.values()
               if torch.is_tensor(t) and t.numel() > 1)  # not the step counters
    assert state_bytes(model, cfg) == held


def test_adam_mini_keeps_one_second_moment_per_block_and_trains(tiny_model_dir):
    from adam_mini import Adam_mini

    _, model, optimizer = _built(tiny_model_dir, {"use_adam_mini": True})
    assert isinstance(optimizer, Adam_mini)
    losses = _steps(model, optimizer)
    assert losses[-1] < losses[0]
    q_proj = model.model.layers[0].self_attn.q_proj.weight  # 64 x 64, 4 heads
    second = optimizer.state[q_proj]["vmean"]
    assert second.numel() == 4  # one per head, where AdamW keeps 4,096
