"""`lmtune export`: merge adapters into their base and write a standalone model.

Adapters that change weights merge into them: the LoRA family (DoRA, rsLoRA, PiSSA, LoRA+), AdaLoRA
and IA3. Prefix, prompt and p-tuning adapters add virtual tokens, which no weight can hold; they are
used as adapters. A model without adapters (a full or freeze fine-tune, an earlier export, a base)
is re-exported: converted to another dtype or format, or sharded by export_size. Merging into
quantized weights would round the merged weights back to 4 or 8 bits, so a quantized base is
refused unless export_full_precision asks for the base in full precision.

Merging runs in float32; the result is written in the dtype the base checkpoint is published in
(infer_dtype: auto), as LLaMA-Factory does, or the one infer_dtype names. export_format hf writes
safetensors weights, the tokenizer and its chat template, so any HF loader (and vLLM) uses it with
the template it was trained with; gguf writes one .gguf file (models/to_gguf.py). Either comes with
an Ollama Modelfile (models/modelfile.py). A reward model (stage rm) keeps its scalar head beside
the merged weights.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from lmtune.config import RunConfig
from lmtune.durable import replace_folder, staging_name, writing
from lmtune.errors import ConfigError, ModelError, TrainingError
from lmtune.models.lineage import EXPORT_RECORD, _weights_folder, lineage_of, weights_of
from lmtune.models.load import (DEFAULT_MODEL, is_quantized, load_model, load_tokenizer, resolve_for,
                                resolve_model, stop_token_ids, tokenizer_source)
from lmtune.models.methods import MERGEABLE, adapter_type, load_adapters
from lmtune.models.modelfile import modelfile
from lmtune.models.scalar_head import HEAD_FILE, LF_HEAD_FILE
from lmtune.models.to_gguf import FOR_DTYPE, check_convertible, write_gguf
from lmtune.train.checkpoint import RUN_CONFIG

EXPORT_MARKER = EXPORT_RECORD  # also what tells export a folder is its own to overwrite
MODELFILE = "Modelfile"
_STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The float dtype that holds most of the bytes of a folder's safetensors weights."""
    sizes: Counter[torch.dtype] = Counter()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                dtype = _STORED.get(tensor.get_dtype())
                if dtype is not None:
                    sizes[dtype] += torch.Size(tensor.get_shape()).numel() * dtype.itemsize
    return sizes.most_common(1)[0][0] if sizes else None


def _published_checkpoint(model_path: str) -> Path:
    """The folder whose dtype an export keeps: for a full or freeze fine-tune of lmtune (which trains
    and saves in float32) the checkpoint it started from when it is on this machine, else the
    model's own folder."""
    run = Path(model_path) / RUN_CONFIG
    base = (yaml.safe_load(run.read_text(encoding="utf-8")) or {}).get("model_name_or_path") \
        if run.is_file() else None
    if isinstance(base, str) and base:
        if base == DEFAULT_MODEL or base.endswith(".gguf") or Path(base).is_dir():
            try:
                return Path(resolve_model(base))
            except ModelError:  # moved or deleted since training: the run's own folder says
                pass
        else:
            found = _weights_folder(base)  # a hub id: only from the local cache, never downloaded
            if found is not None:
                return found
    return Path(model_path)


def export_dtype(cfg: RunConfig, model_path: str) -> torch.dtype:
    if cfg.infer_dtype != "auto":
        return getattr(torch, cfg.infer_dtype)
    return stored_dtype(_published_checkpoint(model_path)) or torch.float32


def _check_export_dir(cfg: RunConfig) -> Path:
    if not cfg.export_dir:
        raise ConfigError("lmtune export needs export_dir.", "add export_dir=saves/merged.")
    out = Path(cfg.export_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export_dir {out} is a file, not a folder.", "choose a folder path.")
    inputs = [("model_name_or_path", cfg.model_name_or_path), ("output_dir", cfg.output_dir or "")]
    inputs += [("adapter_name_or_path", p) for p in cfg.adapter_paths]
    for key, value in inputs:
        path = Path(value).expanduser()
        if value and path.exists() and (path.resolve() == out.resolve() or out.resolve() in
                                        path.resolve().parents):
            raise ConfigError(f"{key}: {value} lies inside export_dir {out}, which the export "
                              "replaces.", "choose another export_dir, e.g. saves/merged.")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ConfigError(f"export_dir {out} is not empty and was not written by lmtune export.",
                          "choose a new or empty export_dir.")
    return out


def export(cfg: RunConfig) -> Path:
    out = _check_export_dir(cfg)
    model_name, adapters = weights_of(cfg)
    model_path = resolve_for(cfg, model_name)
    dtype = export_dtype(cfg, model_path)
    if not adapters and cfg.null_on_command_line("adapter_name_or_path") and \
            cfg.export_format == "hf" and dtype == stored_dtype(Path(model_path)):
        raise ConfigError(f"nothing to export: adapter_name_or_path is null, so there is no adapter "
                          f"to merge, and {model_name} would be copied as it is.",
                          "name the adapter, leave adapter_name_or_path out to export what "
                          "output_dir holds, or convert the model with infer_dtype or export_format.")
    for path in adapters:
        if adapter_type(path) not in MERGEABLE:
            raise ModelError(f"adapter {path} is a {adapter_type(path)} adapter: it adds virtual "
                             "tokens, which no weight can hold, so there is nothing to merge.",
                             "use it as an adapter: lmtune chat with this config, or peft's "
                             "PeftModel.from_pretrained(base, folder).")
    if adapters and cfg.quantization_bit and not cfg.export_full_precision:
        raise ConfigError(f"quantization_bit: {cfg.quantization_bit}: the base is quantized, and "
                          f"merging into it would round the merged weights back to "
                          f"{cfg.quantization_bit} bits.",
                          "reload the base in full precision and merge there: add "
                          "export_full_precision=true (the result differs from the trained model "
                          "by the base's quantization error, as every QLoRA merge does).")
    tokenizer = load_tokenizer(tokenizer_source(model_path, adapters), cfg.trust_remote_code)
    # Merge in fp32: merging in bf16 rounds W + BA and drifts from base + adapter.
    model = load_model(model_path, cfg.trust_remote_code, dtype=torch.float32)
    if is_quantized(model):
        if not cfg.export_full_precision:
            raise ConfigError(f"{model_name} holds quantized weights, and merging into them would "
                              "round the merged weights back to their few bits.",
                              "add export_full_precision=true to dequantize the base to fp32 first "
                              "(or point model_name_or_path to the full-precision model).")
        model = model.dequantize()
    if cfg.export_device == "auto" and torch.cuda.is_available():
        model.to("cuda")  # merging is one matmul per layer: the GPU does it in a blink
    if adapters:
        model = load_adapters(model, adapters, trainable_last=False, merge_last=True)
    model.to("cpu")
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingError(f"the merged weight {name} holds NaN/inf; nothing was exported.",
                                "export an adapter from a run that finished with a finite loss.")
    trained = Path(adapters[-1]) if adapters else Path(model_path)
    if cfg.export_format == "gguf":
        if (trained / HEAD_FILE).is_file():
            raise ConfigError(f"export_format gguf: {trained} is a reward model, and its scalar head "
                              "has no place in a GGUF file.", "export it with export_format: hf.")
        check_convertible(model, Path(tokenizer_source(model_path, adapters)))
        gguf_type = cfg.export_gguf_type if cfg.export_gguf_type != "auto" else FOR_DTYPE[dtype]
        weights, written = f"model-{gguf_type}.gguf", gguf_type
    else:
        weights, written = None, str(dtype).removeprefix("torch.")
        model.to(dtype)  # merging above ran in float32; the GGUF writer rounds from float32 itself
        model.config.dtype = dtype
    kept = (f"The previous export in {out} is unchanged." if out.exists() else "Nothing was exported.")
    # Written whole into a staging folder beside export_dir, then renamed: a failed export never
    # leaves a folder that loads as a model.
    staging = staging_name(out)
    try:
        with writing("the exported model", out, kept):
            out.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            if weights:
                # The GGUF holds the tokenizer and template; the writer reads their files once.
                tokenizer_files = staging / ".tokenizer"
                tokenizer.save_pretrained(tokenizer_files)
                write_gguf(model, tokenizer, tokenizer_files, staging / weights, written,
                           Path(model_name).name)
                shutil.rmtree(tokenizer_files)
            else:
                model.save_pretrained(staging, safe_serialization=True,
                                      max_shard_size=int(cfg.export_size * 10**9))
                tokenizer.save_pretrained(staging)
            text, templated = modelfile(tokenizer, stop_token_ids(tokenizer, model),
                                        f"./{weights}" if weights else ".", cfg)
            (staging / MODELFILE).write_text(text, encoding="utf-8")
            if (trained / HEAD_FILE).is_file():
                # A reward model: its scalar head (and the run config that says how it encodes) go
                # with it, so the merged folder scores as the adapter did (lmtune.train.rm.RewardModel).
                for name in (HEAD_FILE, RUN_CONFIG, LF_HEAD_FILE):
                    if (trained / name).is_file():  # LF_HEAD_FILE: in LLaMA-Factory's full layout
                        shutil.copyfile(trained / name, staging / name)
            # The merged adapters' fingerprints go with the weights: an adapter put on them again is
            # refused by name, and one trained on them is told apart from one trained on the base.
            (staging / EXPORT_MARKER).write_text(json.dumps(
                {"base": cfg.model_name_or_path, "adapters": adapters,
                 "lineage": lineage_of(model).to_json(), "format": cfg.export_format,
                 "weights": weights or "safetensors", "dtype": written}, indent=2))
            replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {model_name}" + (f" + {', '.join(adapters)}" if adapters else "")
          + f" to {out}: {weights or 'safetensors'} ({written}), Ollama {MODELFILE}"
          + ("" if templated else " (no TEMPLATE: Ollama takes the GGUF's chat template)"))
    return out
