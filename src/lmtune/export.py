"""`lmtune export`: merge LoRA adapters into their base and write a standalone HF model.

The merged folder holds safetensors weights, the tokenizer and its chat template, so any HF loader
(and vLLM) uses it with the template it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmtune.config import RunConfig
from lmtune.errors import ConfigError, TrainingError
from lmtune.infer.chat import trained_output
from lmtune.models.load import load_model, load_tokenizer, resolve_model, tokenizer_source
from lmtune.models.methods import load_adapters

EXPORT_MARKER = "lmtune_export.json"


def _check_export_dir(cfg: RunConfig) -> Path:
    if not cfg.export_dir:
        raise ConfigError("lmtune export needs export_dir.", "add export_dir=saves/merged.")
    out = Path(cfg.export_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ConfigError(f"export_dir {out} is not empty and was not written by lmtune export.",
                          "choose a new or empty export_dir.")
    return out


def export(cfg: RunConfig) -> Path:
    out = _check_export_dir(cfg)
    adapters = cfg.adapter_paths
    model_name = cfg.model_name_or_path
    if not adapters:
        full, adapters = trained_output(cfg)
        model_name = full or model_name
    if not adapters and model_name == cfg.model_name_or_path:
        raise ConfigError("nothing to export: no adapter_name_or_path, and output_dir holds no "
                          "trained model.", "set adapter_name_or_path, or output_dir of a finished run.")
    model_path = resolve_model(model_name)
    tokenizer = load_tokenizer(tokenizer_source(model_path, adapters), cfg.trust_remote_code)
    # Merge in fp32: merging in bf16 rounds W + BA and drifts from base + adapter.
    model = load_model(model_path, cfg.trust_remote_code, dtype=torch.float32)
    if adapters:
        model = load_adapters(model, adapters, trainable_last=False).merge_and_unload()
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingError(f"the merged weight {name} holds NaN/inf; nothing was exported.",
                                "export an adapter from a run that finished with a finite loss.")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=f"{cfg.export_size}GB")
    tokenizer.save_pretrained(out)
    (out / EXPORT_MARKER).write_text(json.dumps({"base": cfg.model_name_or_path, "adapters": adapters},
                                                indent=2))
    print(f"exported {model_name}" + (f" + {', '.join(adapters)}" if adapters else "") + f" to {out}")
    return out
