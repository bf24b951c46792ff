"""finetuning_type -> which parameters train: full, freeze (last/first layers or named modules), LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from lmtune.config import RunConfig, split_list
from lmtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of transformer blocks (model.model.layers for Llama-style models)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__} for "
                         "finetuning_type: freeze.", "use finetuning_type: lora or full.")
    return layers


def all_linear_names(model: PreTrainedModel) -> list[str]:
    """Leaf names of every nn.Linear except the output head: what lora_target: all means."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


def apply_freeze(model: PreTrainedModel, cfg: RunConfig) -> None:
    layers = decoder_layers(model)
    n = cfg.freeze_trainable_layers
    if n == 0 or abs(n) > len(layers):
        raise ConfigError(f"freeze_trainable_layers: {n}, but the model has {len(layers)} layers.",
                          f"use a value from 1 to {len(layers)} (last layers) or -1 to -{len(layers)} "
                          "(first layers).")
    chosen = range(len(layers) - n, len(layers)) if n > 0 else range(0, -n)
    modules = split_list(cfg.freeze_trainable_modules)
    model.requires_grad_(False)
    for index in chosen:
        layer = layers[index]
        if modules == ["all"]:
            layer.requires_grad_(True)
            continue
        for module in modules:
            found = [m for name, m in layer.named_modules() if name.split(".")[-1] == module]
            if not found:
                children = sorted({name.split(".")[0] for name, _ in layer.named_children()})
                raise ConfigError(f"freeze_trainable_modules: no module '{module}' in decoder layer "
                                  f"{index}.", f"use 'all' or names among: {', '.join(children)}.")
            for m in found:
                m.requires_grad_(True)


def lora_config(model: PreTrainedModel, cfg: RunConfig) -> LoraConfig:
    targets = split_list(cfg.lora_target)
    if targets == ["all"]:
        targets = all_linear_names(model)
    else:
        known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise ConfigError(f"lora_target: no module named {', '.join(unknown)} in "
                              f"{type(model).__name__}.",
                              f"use 'all' or names among: {', '.join(all_linear_names(model))}.")
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")


def load_adapters(model: PreTrainedModel, paths: list[str], trainable_last: bool):
    """Load PEFT adapters in order. All but the last are merged into the base weights; the last stays
    an adapter (trainable when `trainable_last`)."""
    for i, path in enumerate(paths):
        if not (Path(path) / "adapter_config.json").is_file():
            raise ModelError(f"adapter_name_or_path: {path} holds no adapter_config.json.",
                             "point to a folder written by lmtune train (finetuning_type: lora) or peft.")
        if not (Path(path) / "adapter_model.safetensors").is_file():
            raise ModelError(f"adapter_name_or_path: {path} has no adapter_model.safetensors; "
                             "lmtune reads adapter weights only as safetensors, never as pickles.",
                             "save the adapter with peft's save_pretrained(safe_serialization=True).")
        last = i == len(paths) - 1
        try:
            model = PeftModel.from_pretrained(model, path, is_trainable=last and trainable_last)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"adapter {path} does not fit this base model: {str(exc).splitlines()[0]}",
                             "use the base model the adapter was trained on.") from None
        if not last:
            model = model.merge_and_unload()
    return model


def apply_method(model: PreTrainedModel, cfg: RunConfig):
    """Mark what trains for cfg.finetuning_type; returns the (possibly PEFT-wrapped) model."""
    if cfg.finetuning_type == "full":
        model.requires_grad_(True)
    elif cfg.finetuning_type == "freeze":
        apply_freeze(model, cfg)
    elif cfg.adapter_paths:
        model = load_adapters(model, cfg.adapter_paths, trainable_last=True)
    else:
        model = get_peft_model(model, lora_config(model, cfg))
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
