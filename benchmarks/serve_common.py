"""What the serve benchmarks share: a model to serve and LoRA adapters made for it.

Adapters are LoRA r=8 on every linear layer with small random B matrices: each changes the model's
answers a little, and costs what a trained adapter of that shape costs. `--smoke` swaps the model
for a 2-layer random one of the same architecture, to check that a script runs (numbers meaningless).
"""

from __future__ import annotations

from pathlib import Path

import torch


def model_folder(name: str, smoke: bool, work: Path) -> str:
    from lmtune.models.load import load_tokenizer, resolve_model

    path = resolve_model(name)
    if not smoke:
        return path
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    folder = work / "smoke-model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer(path).save_pretrained(folder)
    return str(folder)


def make_adapters(model_dir: str, count: int, work: Path) -> list[str]:
    from peft import LoraConfig, get_peft_model

    from lmtune.models.load import load_model

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(load_model(model_dir), LoraConfig(
            r=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=1e-3)
        folder = work / f"adapter-{i}"
        model.save_pretrained(folder)
        paths.append(str(folder))
    return paths


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
