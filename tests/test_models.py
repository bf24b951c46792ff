"""Model resolution and loading (offline, GGUF cache, safety), and what each method makes trainable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmtune.config import build_config
from lmtune.errors import ConfigError, ModelError
from lmtune.models import load
from lmtune.models.load import default_gguf, load_model, resolve_model
from lmtune.models.methods import apply_method, count_parameters, load_adapters


def test_default_model_converts_once_and_reloads_without_converting(default_model_dir, monkeypatch,
                                                                      tmp_path):
    def converting(gguf, target):
        raise AssertionError(f"{gguf} converted again")

    monkeypatch.setattr(load, "_convert", converting)
    assert resolve_model("default") == default_model_dir
    assert resolve_model(str(default_gguf())) == default_model_dir  # same file, same cache folder
    # The same bytes elsewhere (another virtual environment, a reinstall) share the conversion.
    elsewhere = tmp_path / default_gguf().name
    shutil.copyfile(default_gguf(), elsewhere)
    assert resolve_model(str(elsewhere)) == default_model_dir
    with open(elsewhere, "ab") as f:  # other bytes: another folder, so a conversion
        f.write(b"\0")
    with pytest.raises(AssertionError, match="converted again"):
        resolve_model(str(elsewhere))
    folder = Path(default_model_dir)
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and "quantization_config" not in config


@pytest.mark.parametrize("name, expected", [
    ("missing.gguf", "GGUF file not found"),
    ("./no/such/folder", "folder not found"),
])
def test_bad_model_paths_are_clear_errors(name, expected):
    with pytest.raises(ModelError) as info:
        resolve_model(name)
    assert expected in info.value.message


def test_folder_without_config_and_non_model_file(tmp_path):
    with pytest.raises(ModelError) as info:
        resolve_model(str(tmp_path))
    assert "no config.json" in info.value.message
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(ModelError) as info:
        resolve_model(str(weights))
    assert "not a .gguf model" in info.value.message


def test_remote_code_is_refused_unless_trusted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "shiny_custom", "auto_map": {"AutoConfig": "shiny.ShinyConfig",
                                                   "AutoModelForCausalLM": "shiny.ShinyModel"}}))
    (tmp_path / "shiny.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path))
    assert "trust_remote_code" in str(info.value)


def _cfg(tiny_model_dir, **keys):
    return build_config({"model_name_or_path": tiny_model_dir, **keys})


def test_lora_all_targets_every_linear_but_the_head(tiny_model_dir):
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         _cfg(tiny_model_dir, lora_rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # r * (in + out) per adapted matrix: 2 layers x (q,o: 64+64; k,v: 64+32; gate,up,down: 64+128)
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert count_parameters(model)[0] == 2 * per_layer


def test_lora_target_list_and_unknown_names(tiny_model_dir):
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         _cfg(tiny_model_dir, lora_target="q_proj,v_proj", lora_rank=2))
    assert count_parameters(model)[0] == 2 * 2 * ((64 + 64) + (64 + 32))
    with pytest.raises(ConfigError) as info:
        apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                     _cfg(tiny_model_dir, lora_target="q_proj,qkv"))
    assert "qkv" in info.value.message and "gate_proj" in info.value.fix


def test_freeze_first_layers_and_bad_values(tiny_model_dir):
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         _cfg(tiny_model_dir, finetuning_type="freeze", freeze_trainable_layers=-1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.0.") for n in trainable)
    for keys in ({"freeze_trainable_layers": 3}, {"freeze_trainable_modules": "ffn"}):
        with pytest.raises(ConfigError):
            apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         _cfg(tiny_model_dir, finetuning_type="freeze", **keys))


def test_llama_pro_trains_the_last_layer_of_each_group(tiny_model_dir, tmp_path):
    # A 4-layer model expanded from 2 (LLaMA-Pro puts each added block after its group): the added
    # blocks are layers 1 and 3.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 4
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "expanded")
    model = apply_method(AutoModelForCausalLM.from_pretrained(tmp_path / "expanded"),
                         _cfg(tiny_model_dir, finetuning_type="freeze", use_llama_pro=True,
                              freeze_trainable_layers=2))
    trained = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"1", "3"}
    with pytest.raises(ConfigError) as info:  # 3 groups do not divide 4 layers
        apply_method(AutoModelForCausalLM.from_pretrained(tmp_path / "expanded"),
                     _cfg(tiny_model_dir, finetuning_type="freeze", use_llama_pro=True,
                          freeze_trainable_layers=3))
    assert "use_llama_pro" in info.value.message and "divides 4" in info.value.fix


def test_adapters_load_in_order_and_refuse_another_base(tiny_model_dir, tmp_path):
    def make_adapter(seed: int) -> str:
        torch.manual_seed(seed)
        model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             _cfg(tiny_model_dir, lora_rank=2))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
        folder = tmp_path / f"adapter{seed}"
        model.save_pretrained(folder)
        return str(folder)

    first, second = make_adapter(1), make_adapter(2)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stacked = load_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [first, second],
                            trainable_last=True)
    trainable = {n for n, p in stacked.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the last stays a trainable adapter
    ids = torch.tensor([[1, 42, 77, 2]])
    assert not torch.allclose(stacked(ids).logits, base(ids).logits, atol=1e-4)

    with pytest.raises(ModelError) as info:
        load_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [str(tmp_path)], True)
    assert "adapter_config.json" in info.value.message

    other_config = AutoConfig.from_pretrained(tiny_model_dir)
    other_config.update({"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1})
    other = AutoModelForCausalLM.from_config(other_config)
    with pytest.raises(ModelError) as info:
        load_adapters(other, [first], trainable_last=False)
    assert "does not fit" in info.value.message


def test_a_cpu_run_hands_sdpa_grouped_keys_and_values_unrepeated(tiny_model_dir, monkeypatch):
    """With a padding mask too: sdpa gets the model's key and value heads as they are (nothing
    repeated for it to keep for backward), and the loss is the same."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append((key.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setenv(load.FORCE_GROUPED_KV, "0")
    monkeypatch.delenv(load.FORCE_GROUPED_KV)
    repeated = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    load.grouped_kv_on_cpu()
    grouped = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert seen[0] == (model.config.num_attention_heads, False)
    assert seen[-1] == (model.config.num_key_value_heads, True)
    assert grouped.item() == pytest.approx(repeated.item(), rel=1e-5)
