"""Every fine-tuning method: what it trains (counted by hand), that it trains, that frozen weights
stay put, that its output reloads for chat and merges on export, and the keys it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import lmtune.train.sft as sft
from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import ConfigError, ModelError
from lmtune.infer.chat import ChatSession
from lmtune.models.load import load_model, quantization_config
from lmtune.models.methods import (AdaLoraHooks, TrainingHooks, apply_method,
                                   check_untouched_4bit, count_parameters, evaluation,
                                   load_adapters)
from lmtune.train.engine import build_optimizer
from tests.conftest import write_yaml

# The tiny model (conftest): 2 layers, hidden 64, MLP 128, 4 query heads and 2 key/value heads of
# 16, vocabulary 49,152, output head tied to the embedding. (in, out) of each linear layer:
H, FFN, KV, LAYERS, VOCAB = 64, 128, 2 * 16, 2, 49152
LINEAR = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
          "gate_proj": (H, FFN), "up_proj": (H, FFN), "down_proj": (FFN, H)}
LAYER = sum(i * o for i, o in LINEAR.values()) + 2 * H  # + input and post-attention RMSNorm
FULL = VOCAB * H + LAYERS * LAYER + H  # + the final norm; the head shares the embedding


def lora(r: int, names=tuple(LINEAR)) -> int:
    return LAYERS * sum(r * (LINEAR[n][0] + LINEAR[n][1]) for n in names)


def oft(block: int, names=tuple(LINEAR)) -> int:
    """OFT: per target, in/block blocks, each a skew-symmetric block x block matrix (its upper
    triangle trains)."""
    return LAYERS * sum(LINEAR[n][0] // block * block * (block - 1) // 2 for n in names)


# method -> (keys, trainable parameters as the method promises them)
METHODS = {
    "full": ({"finetuning_type": "full"}, FULL),
    "freeze": ({"finetuning_type": "freeze", "freeze_trainable_layers": 1,
                "freeze_extra_modules": "norm"}, LAYER + H),
    "lora": ({"lora_rank": 4}, lora(4)),
    "rslora": ({"lora_rank": 4, "use_rslora": True}, lora(4)),
    # DoRA adds one magnitude per output row of every adapted matrix.
    "dora": ({"lora_rank": 4, "use_dora": True}, lora(4) + LAYERS * sum(o for _, o in LINEAR.values())),
    "pissa": ({"lora_rank": 4, "pissa_init": True, "pissa_iter": 4}, lora(4)),
    "loraplus": ({"lora_rank": 4, "loraplus_lr_ratio": 16}, lora(4)),
    # modules_to_save: a full trainable copy of the final norm, and only of it (not the layer norms).
    "lora+norm": ({"lora_rank": 2, "lora_target": "q_proj", "additional_target": "norm"},
                  lora(2, ["q_proj"]) + H),
    "qlora4": ({"lora_rank": 4, "quantization_bit": 4}, lora(4)),
    "qlora8": ({"lora_rank": 4, "quantization_bit": 8, "lora_target": "q_proj,v_proj"},
               lora(4, ["q_proj", "v_proj"])),
    "oft": ({"finetuning_type": "oft", "oft_block_size": 16}, oft(16)),
    "oft-rank": ({"finetuning_type": "oft", "oft_rank": 2, "oft_block_size": 0,
                  "oft_target": "q_proj,down_proj", "additional_target": "norm"},
                 LAYERS * (2 * 32 * 31 // 2 + 2 * 64 * 63 // 2) + H),
    "qoft4": ({"finetuning_type": "oft", "oft_block_size": 16, "quantization_bit": 4}, oft(16)),
    # AdaLoRA: P (r x in), Q (out x r) and r singular values per matrix, at its initial rank.
    "adalora": ({"finetuning_type": "adalora", "lora_target": "q_proj,v_proj", "adalora_init_r": 6,
                 "adalora_target_r": 2, "adalora_tfinal": 1},
                LAYERS * sum(6 * (LINEAR[n][0] + LINEAR[n][1]) + 6 for n in ("q_proj", "v_proj"))),
    # IA3 (peft's Llama default): a vector on the key and value outputs and on the FFN's inner input.
    "ia3": ({"finetuning_type": "ia3"}, LAYERS * (KV + KV + FFN)),
    # Prefix: a key and a value vector (2 kv heads x 16) per virtual token in every layer.
    "prefix": ({"finetuning_type": "prefix", "num_virtual_tokens": 4}, 4 * LAYERS * 2 * KV),
    # With the projection: token embeddings (width KV) through KV->16->every layer's keys/values.
    "prefix-mlp": ({"finetuning_type": "prefix", "num_virtual_tokens": 4, "prefix_projection": True,
                    "encoder_hidden_size": 16},
                   4 * KV + (KV * 16 + 16) + (16 * LAYERS * 2 * KV + LAYERS * 2 * KV)),
    "prompt": ({"finetuning_type": "prompt", "num_virtual_tokens": 4}, 4 * H),
    "prompt-text": ({"finetuning_type": "prompt", "num_virtual_tokens": 6,
                     "prompt_tuning_init": "text", "prompt_tuning_init_text": "You are kind."}, 6 * H),
    # P-tuning: embeddings, then an MLP H->16->16->H producing the virtual tokens.
    "ptuning": ({"finetuning_type": "ptuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
                4 * H + (H * 16 + 16) + (16 * 16 + 16) + (16 * H + H)),
}
MERGEABLE = {"full", "freeze", "lora", "rslora", "dora", "pissa", "loraplus", "lora+norm", "adalora",
             "ia3", "qlora4", "qlora8", "oft", "oft-rank", "qoft4"}
IDS = torch.tensor([[1, 9690, 198, 33, 42, 2, 198, 1, 4093]])


def _cfg(tiny_model_dir, **keys):
    return build_config({"model_name_or_path": tiny_model_dir, **keys})


def _fresh(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def logits(model) -> torch.Tensor:
    # Training mode on purpose: an eval-mode forward repacks a 4-bit base for CPU inference (see
    # methods.check_untouched_4bit); without dropout both modes compute the same function. Prompt
    # methods put their virtual positions first: the text's logits are the last ones.
    model.train()
    with torch.no_grad():
        return model(input_ids=IDS).logits[:, -IDS.shape[1]:]


# --- what each method trains ---------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_count_is_what_the_method_promises(tiny_model_dir, method):
    keys, expected = METHODS[method]
    cfg = _cfg(tiny_model_dir, **keys)
    model = apply_method(load_model(tiny_model_dir, quantization=quantization_config(cfg)), cfg)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total >= FULL  # a 4-bit base counts its unpacked size, not its bytes


def test_a_quantized_method_on_a_full_precision_base_is_refused(tiny_model_dir):
    with pytest.raises(ModelError) as info:
        apply_method(_fresh(tiny_model_dir), _cfg(tiny_model_dir, lora_rank=2, quantization_bit=4))
    assert "loaded in full precision" in info.value.message and "quantization=" in info.value.fix


def test_ia3_all_targets_scale_ffn_inputs_and_attention_outputs(tiny_model_dir):
    model = apply_method(_fresh(tiny_model_dir), _cfg(tiny_model_dir, finetuning_type="ia3",
                                                      ia3_target="all"))
    attention = H + KV + KV + H  # outputs of q, k, v, o
    ffn = H + H + FFN  # inputs of gate, up, down
    assert count_parameters(model)[0] == LAYERS * (attention + ffn)


def test_oft_block_size_must_divide_every_target_width(tiny_model_dir):
    with pytest.raises(ConfigError) as info:  # q_proj's input is 64 wide, down_proj's 128
        apply_method(_fresh(tiny_model_dir), _cfg(tiny_model_dir, finetuning_type="oft",
                                                  oft_block_size=24))
    assert "oft_block_size: 24" in info.value.message and "64, 128" in info.value.message
    assert "oft_block_size: 32" in info.value.fix


def test_oft_adapter_is_refused_on_other_weights(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, finetuning_type="oft", oft_block_size=16, oft_target="q_proj")
    model = apply_method(_fresh(tiny_model_dir), cfg)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.1)
    TrainingHooks().save(model, tmp_path / "oft", final=True)
    assert json.loads((tmp_path / "oft" / "adapter_config.json").read_text())["peft_type"] == "OFT"
    reloaded = load_adapters(_fresh(tiny_model_dir), [str(tmp_path / "oft")], trainable_last=False)
    torch.testing.assert_close(logits(reloaded), logits(model))
    other = _fresh(tiny_model_dir)
    torch.manual_seed(5)
    other.model.layers[0].self_attn.q_proj.weight.data.normal_()  # the same shapes, other weights
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelError) as info:
        load_adapters(AutoModelForCausalLM.from_pretrained(tmp_path / "other"),
                      [str(tmp_path / "oft")], trainable_last=False)
    assert "was trained on" in info.value.message


def test_unknown_module_names_are_config_errors(tiny_model_dir):
    cases = [({"finetuning_type": "freeze", "freeze_extra_modules": "q_proj"}, "outside the decoder"),
             ({"additional_target": "lm_hed"}, "lm_hed"),
             ({"finetuning_type": "ia3", "ia3_target": "qkv"}, "qkv")]
    for keys, expected in cases:
        with pytest.raises(ConfigError) as info:
            apply_method(_fresh(tiny_model_dir), _cfg(tiny_model_dir, **keys))
        assert expected in info.value.message and "names among" in info.value.fix


# --- train, freeze, reload, export ----------------------------------------------------------------

def _train(monkeypatch, tmp_path: Path, config: dict) -> dict:
    """`lmtune train`; returns the model as it left the loop and its parameters before training."""
    seen: dict = {}
    real_fit = sft.fit

    def spy(cfg, model, *args, **kwargs):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["model"] = model
        return real_fit(cfg, model, *args, **kwargs)

    monkeypatch.setattr(sft, "fit", spy)
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    return seen


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_reloads_and_exports(method, monkeypatch, tmp_path, train_config, tiny_model_dir):
    keys, expected = METHODS[method]
    config = {k: v for k, v in train_config.items() if k != "lora_rank"} | keys | {"max_steps": 3}
    seen = _train(monkeypatch, tmp_path, config)
    model, before = seen["model"], seen["before"]
    out = Path(config["output_dir"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["trainable_params"] == expected
    assert math.isfinite(results["train_loss"]) and results["train_loss"] > 0

    # The trainable parameters moved; every frozen one is byte-identical.
    params = dict(model.named_parameters())
    moved = [n for n, p in params.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no trainable parameter changed"
    assert all(torch.equal(p, before[n]) for n, p in params.items() if not p.requires_grad)

    # What chat loads from output_dir computes what training left in memory.
    quantized = "quantization_bit" in keys
    chat = ChatSession.from_config(build_config(config)).model
    if quantized:  # chat puts the adapter on the full-precision base; on the 4-bit one it is exact
        base = load_model(tiny_model_dir, quantization=quantization_config(build_config(config)))
        reloaded = load_adapters(base, [str(out)], trainable_last=False)
        torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(logits(chat), logits(model), atol=1e-5, rtol=1e-5)
    assert (logits(chat) - logits(_fresh(tiny_model_dir))).abs().max() > 1e-4  # not a no-op

    export = ["export", str(tmp_path / "run.yaml"), f"export_dir={tmp_path / 'merged'}"]
    if method not in MERGEABLE:
        assert main(export) == 2 and not (tmp_path / "merged").exists()
        return
    if quantized:
        assert main(export) == 2  # refused: the base is quantized
        export.append("export_full_precision=true")
    assert main(export) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(chat), atol=1e-4, rtol=1e-4)


def test_quantized_export_refusal_says_how(tmp_path, capsys, train_config):
    config = train_config | {"quantization_bit": 4, "export_dir": str(tmp_path / "merged")}
    (Path(config["output_dir"])).mkdir(parents=True)
    (Path(config["output_dir"]) / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert main(["export", str(write_yaml(tmp_path / "q.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "quantization_bit: 4" in err and "export_full_precision=true" in err
    assert "full precision" in err


def test_pissa_output_is_plain_lora_of_twice_the_rank(monkeypatch, tmp_path, train_config):
    config = train_config | {"pissa_init": True, "pissa_iter": 4, "max_steps": 2}
    _train(monkeypatch, tmp_path, config)
    out = Path(config["output_dir"])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 * train_config["lora_rank"] and adapter["init_lora_weights"] is True
    assert not (out / "pissa_init").exists()


# --- LoRA+ --------------------------------------------------------------------------------------------

def test_loraplus_groups_carry_their_learning_rates(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, lora_target="q_proj,embed_tokens", lora_rank=2, learning_rate=1e-4,
               loraplus_lr_ratio=16, loraplus_lr_embedding=1e-6, weight_decay=0.1)
    model = apply_method(_fresh(tiny_model_dir), cfg)
    optimizer = build_optimizer(model, cfg)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {"lora_A": 1e-4, "lora_B": 16e-4, "lora_embedding_A": 1e-6, "lora_embedding_B": 1e-6}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for kind, lr in expected.items():
        chosen = [p for n, p in named.items() if f".{kind}." in n]
        assert chosen and all(lr_of[id(p)] == pytest.approx(lr) for p in chosen), kind
    assert len(lr_of) == len(named)  # every trainable parameter is in exactly one group
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # the logged lr is the base one
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups)  # all are matrices

    plain = build_optimizer(model, _cfg(tiny_model_dir, lora_rank=2, learning_rate=1e-4))
    assert {g["lr"] for g in plain.param_groups} == {1e-4}


# --- adapters on adapters -----------------------------------------------------------------------------

def _saved_adapter(tiny_model_dir, folder: Path, config) -> str:
    torch.manual_seed(sum(str(folder).encode()))  # distinct folders, distinct weights
    model = get_peft_model(_fresh(tiny_model_dir), config)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.5)
    model.save_pretrained(folder)
    return str(folder)


def test_create_new_adapter_merges_all_and_starts_fresh(tiny_model_dir, tmp_path):
    lora_cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    first = _saved_adapter(tiny_model_dir, tmp_path / "a", lora_cfg)
    second = _saved_adapter(tiny_model_dir, tmp_path / "b", lora_cfg)
    merged = load_adapters(_fresh(tiny_model_dir), [first, second], trainable_last=False,
                           merge_last=True)
    model = apply_method(_fresh(tiny_model_dir), _cfg(
        tiny_model_dir, adapter_name_or_path=f"{first},{second}", create_new_adapter=True,
        finetuning_type="ia3"))
    assert model.active_peft_config.peft_type == "IA3"
    assert count_parameters(model)[0] == METHODS["ia3"][1]
    # A fresh IA3 adapter starts as the identity, so the model is base + both adapters merged.
    torch.testing.assert_close(logits(model), logits(merged), atol=1e-5, rtol=1e-5)


def test_adapter_kind_mismatches_are_refused(tiny_model_dir, tmp_path):
    prompt = _saved_adapter(tiny_model_dir, tmp_path / "prompt",
                            PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    lora_adapter = _saved_adapter(tiny_model_dir, tmp_path / "lora",
                                  LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ModelError) as info:  # virtual tokens cannot be merged into weights
        load_adapters(_fresh(tiny_model_dir), [prompt, lora_adapter], trainable_last=False)
    assert "PROMPT_TUNING" in info.value.message and "last" in info.value.fix
    with pytest.raises(ConfigError) as info:  # continuing a LoRA adapter as IA3
        apply_method(_fresh(tiny_model_dir), _cfg(tiny_model_dir, adapter_name_or_path=lora_adapter,
                                                  finetuning_type="ia3"))
    assert "LORA adapter" in info.value.message and "create_new_adapter" in info.value.fix
    with pytest.raises(ConfigError) as info:  # peft cannot reload virtual tokens as trainable
        apply_method(_fresh(tiny_model_dir), _cfg(tiny_model_dir, adapter_name_or_path=prompt,
                                                  finetuning_type="prompt"))
    assert "cannot continue training" in info.value.message
    # ...but they are used for chat as the last adapter, after merged weight adapters.
    model = load_adapters(_fresh(tiny_model_dir), [lora_adapter, prompt], trainable_last=False)
    assert model.active_peft_config.peft_type == "PROMPT_TUNING"


# --- prompt-side generation -----------------------------------------------------------------------

class _Record(LogitsProcessor):
    def __init__(self):
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


@pytest.mark.parametrize("config", [
    PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
], ids=["prefix", "prompt"])
def test_virtual_token_generation_matches_the_training_forward(tiny_model_dir, tmp_path, config):
    folder = _saved_adapter(tiny_model_dir, tmp_path / "adapter", config)
    model = load_adapters(_fresh(tiny_model_dir), [folder], trainable_last=False).eval()
    ids = torch.tensor([[2, 2, 1, 9690, 198, 33], [1, 9690, 198, 33, 42, 2]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as chat's batches have
    record = _Record()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=2, eos_token_id=None,
                             logits_processor=LogitsProcessorList([record]))
    assert out.shape == (2, ids.shape[1] + 4) and torch.equal(out[:, :ids.shape[1]], ids)
    base = _fresh(tiny_model_dir).eval()
    for row, start in ((0, 2), (1, 0)):
        for step, scores in enumerate(record.scores):
            text = out[row:row + 1, start: ids.shape[1] + step]
            with torch.no_grad():
                expected = model(input_ids=text).logits[0, -1]
                plain = base(input_ids=text).logits[0, -1]
            torch.testing.assert_close(scores[row], expected, atol=1e-4, rtol=1e-4)
            assert (scores[row] - plain).abs().max() > 1e-3  # the virtual tokens were used


# --- AdaLoRA ------------------------------------------------------------------------------------------

def test_adalora_shrinks_ranks_to_the_budget(monkeypatch, tmp_path, train_config):
    keys = {"finetuning_type": "adalora", "lora_target": "q_proj,v_proj", "adalora_init_r": 6,
            "adalora_target_r": 2, "adalora_tfinal": 1, "max_steps": 4, "learning_rate": 1e-2}
    config = {k: v for k, v in train_config.items() if k != "lora_rank"} | keys
    _train(monkeypatch, tmp_path, config)
    adapter = json.loads((Path(config["output_dir"]) / "adapter_config.json").read_text())
    ranks = {name: sum(mask) for name, mask in adapter["rank_pattern"].items()}
    assert len(ranks) == LAYERS * 2 and sum(ranks.values()) == 2 * len(ranks)  # target_r on average


def test_adalora_orthogonality_penalty_and_schedule_check(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, finetuning_type="adalora", lora_target="q_proj", adalora_init_r=6,
               adalora_target_r=2, adalora_tinit=2, adalora_tfinal=2)
    model = apply_method(_fresh(tiny_model_dir), cfg)
    hooks = AdaLoraHooks(model, total_steps=10)
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            param.data.zero_()
    # Zero factors: ||0 - I_6||_F = sqrt(6) for every A and B.
    assert hooks.orthogonality_penalty().item() == pytest.approx(6 ** 0.5)
    with pytest.raises(ConfigError) as info:
        AdaLoraHooks(model, total_steps=4)
    assert "adalora_tinit" in info.value.message and "more steps" in info.value.fix


# --- 4-bit on CPU: never infer before training ------------------------------------------------------

def _repacks_on_this_cpu() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return has_avx512bf16()


@pytest.mark.skipif(not _repacks_on_this_cpu(), reason="bitsandbytes repacks 4-bit weights only on "
                    "CPUs with avx512_bf16")
def test_4bit_model_that_generated_is_refused_and_eval_during_training_is_safe(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, quantization_bit=4, lora_rank=2)
    model = apply_method(load_model(tiny_model_dir, quantization=quantization_config(cfg)), cfg)
    with evaluation(model), torch.no_grad():  # the loop's eval pass keeps the weights trainable
        model(input_ids=IDS)
    check_untouched_4bit(model)
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=IDS, max_new_tokens=2, do_sample=False, pad_token_id=2)
    with pytest.raises(ModelError) as info:
        check_untouched_4bit(model)
    assert "repacked" in info.value.message and "afresh" in info.value.fix


def test_training_refuses_a_4bit_model_that_generated(tiny_model_dir, train_config, tmp_path,
                                                      monkeypatch, capsys):
    if not _repacks_on_this_cpu():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with avx512_bf16")
    real_apply = sft.apply_method

    def generate_first(model, cfg):  # e.g. a script that asks the base a question, then trains
        model = real_apply(model, cfg)
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=IDS, max_new_tokens=1, do_sample=False, pad_token_id=2)
        return model

    monkeypatch.setattr(sft, "apply_method", generate_first)
    config = train_config | {"quantization_bit": 4}
    assert main(["train", str(write_yaml(tmp_path / "q.yaml", config))]) == 2
    assert "repacked for CPU inference" in capsys.readouterr().err
    assert not (Path(config["output_dir"]) / "adapter_model.safetensors").exists()


def test_qlora_loads_its_base_once_quantized(train_config, tmp_path, monkeypatch):
    # quantized as it loads: a full-precision load first held every weight at full width, then
    # the reload's while it quantized
    import lmtune.train.setup as setup

    loads = []
    real = setup.load_model

    def load_and_note(*args, **kwargs):
        loads.append(kwargs.get("quantization") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(setup, "load_model", load_and_note)
    config = train_config | {"quantization_bit": 4, "max_steps": 1}
    assert main(["train", str(write_yaml(tmp_path / "q.yaml", config))]) == 0
    assert loads == [True]


def test_qlora_with_new_tokens_is_refused(train_config, tmp_path, capsys):
    # a full-precision base grew, then its quantized reload (the vocabulary as stored) trained
    # without the new rows
    config = train_config | {"quantization_bit": 4, "max_steps": 1, "add_special_tokens": "<|tool|>"}
    assert main(["train", str(write_yaml(tmp_path / "q.yaml", config))]) == 2
    assert "embeddings of a quantized base cannot grow" in capsys.readouterr().err
    assert not (Path(config["output_dir"]) / "adapter_model.safetensors").exists()


# --- keys of other methods ----------------------------------------------------------------------------

@pytest.mark.parametrize("keys, words", [
    ({"finetuning_type": "full", "use_dora": True}, ["use_dora", "lora", "full"]),
    ({"finetuning_type": "lora", "num_virtual_tokens": 8},
     ["num_virtual_tokens", "prefix, prompt or ptuning", "lora"]),
    ({"finetuning_type": "lora", "adalora_init_r": 8}, ["adalora_init_r", "adalora"]),
    ({"finetuning_type": "adalora", "lora_rank": 8}, ["lora_rank", "belongs to finetuning_type: lora"]),
    ({"finetuning_type": "prompt", "prefix_projection": True}, ["prefix_projection", "prefix"]),
    ({"finetuning_type": "freeze", "quantization_bit": 4}, ["quantization_bit", "freeze"]),
    ({"finetuning_type": "ia3", "lora_target": "q_proj"}, ["lora_target", "lora or adalora"]),
    ({"quantization_type": "fp4"}, ["quantization_type", "quantization_bit: 4"]),
    ({"quantization_bit": 8, "double_quantization": False}, ["double_quantization", "quantization_bit: 4"]),
    ({"pissa_iter": 4}, ["pissa_iter", "pissa_init: true"]),
    ({"loraplus_lr_embedding": 1e-5}, ["loraplus_lr_embedding", "loraplus_lr_ratio"]),
    ({"create_new_adapter": True}, ["create_new_adapter", "adapter_name_or_path"]),
    ({"finetuning_type": "prefix", "encoder_hidden_size": 16}, ["encoder_hidden_size", "prefix_projection"]),
    ({"finetuning_type": "prompt", "prompt_tuning_init": "text"}, ["prompt_tuning_init_text"]),
    ({"pissa_init": True, "use_dora": True}, ["pissa_init", "use_dora"]),
    ({"pissa_init": True, "quantization_bit": 4}, ["pissa_init", "quantization_bit"]),
    ({"pissa_init": True, "pissa_iter": 0}, ["pissa_iter: 0"]),
    ({"finetuning_type": "adalora", "adalora_init_r": 4, "adalora_target_r": 8}, ["adalora_target_r"]),
    ({"finetuning_type": "adalora", "resume_from_checkpoint": "auto"}, ["adalora", "resume"]),
    ({"finetuning_type": "oft", "oft_rank": 4}, ["oft_rank: 4", "oft_block_size: 32", "exactly one"]),
    ({"finetuning_type": "oft", "oft_block_size": 0}, ["oft_rank: 0", "exactly one"]),
    ({"finetuning_type": "lora", "oft_block_size": 16}, ["oft_block_size", "finetuning_type: oft"]),
    ({"finetuning_type": "oft", "lora_rank": 4}, ["lora_rank", "finetuning_type: lora"]),
    ({"finetuning_type": "full", "module_dropout": 0.1}, ["module_dropout", "oft"]),
])
def test_keys_that_cannot_apply_are_refused_with_the_reason(keys, words):
    with pytest.raises(ConfigError) as info:
        build_config(keys)
    text = str(info.value)
    assert all(word in text for word in words), text
    assert info.value.fix


def test_method_keys_of_the_chosen_method_load(tiny_model_dir):
    for keys, _ in METHODS.values():
        build_config(keys)
    cfg = build_config({"finetuning_type": "adalora", "lora_target": "q_proj", "lora_alpha": 4})
    assert cfg.lora_alpha == 4  # LoRA's shared keys apply to AdaLoRA too
