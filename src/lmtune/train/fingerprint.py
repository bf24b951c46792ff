"""What a run is made of: the config keys that change its math, the contents of its data, and the
files and folders it reads (which its own output_dir must never hold).

Resume is refused when anything but RESUME_MAY_CHANGE differs from the checkpoint's config, or when
the data files' contents changed: a name is not the data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmtune.config import RunConfig, split_list
from lmtune.data import tokenized
from lmtune.data.sources import read_dataset_info, resolve_dataset

# Keys that change how a run is logged, saved, evaluated or where it writes, never what it computes.
# Every other key is compared on resume; a new key is therefore protected unless listed here.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "save_steps",
    "save_strategy", "logging_first_step",
    "save_total_limit", "plot_loss", "report_to", "eval_strategy", "eval_steps",
    "per_device_eval_batch_size", "overwrite_cache", "preprocessing_num_workers",
    # where encoded rows are kept: the data fingerprint still guards what they are
    "tokenized_path", "eval_on_each_dataset",
    "gradient_checkpointing", "checkpoint_every_n_layers", "group_by_length", "chunked_cross_entropy", "allocator", "do_train", "export_dir", "export_size", "export_device",
    "export_legacy_format", "export_full_precision", "not_applied",
    "infer_dtype", "export_format", "export_gguf_type",
    # what happens after training or beside it: prediction, benchmarks, serving
    "eval_generate_samples", "do_predict", "predict_with_generate", "num_beams", "eval_num_beams",
    "length_penalty",
    "skip_special_tokens", "task", "task_dir", "n_shot", "lang", "batch_size", "save_dir",
    "infer_backend", "ddp_timeout",
    # part of the global batch, which Trainer.resume compares (another number of processes may
    # resume a checkpoint with the accumulation that keeps the global batch)
    "gradient_accumulation_steps",
    # how the same update is spread over the processes: FSDP2's sharded checkpoints load into DDP
    # or one process, and a whole checkpoint into FSDP2 shards
    "fsdp", "fsdp_config",
})
# Generation settings are chat's business, except in ppo, whose rollouts sample with them.
_GENERATION = frozenset({"do_sample", "temperature", "top_p", "top_k", "max_new_tokens",
                         "repetition_penalty"})


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Keys whose change makes `now` a different run than the one `saved` belongs to."""
    free = RESUME_MAY_CHANGE | (_GENERATION if now.get("stage") != "ppo" else frozenset())
    return sorted(k for k in set(saved) | set(now) if k not in free and saved.get(k) != now.get(k))


def _dataset_paths(cfg: RunConfig, names: list[str]) -> list[tuple[str, Path | str]]:
    """(name, file or folder) of each dataset; a hub dataset gives its id instead of a path."""
    dataset_dir = Path(cfg.dataset_dir)
    info = read_dataset_info(dataset_dir)
    out: list[tuple[str, Path | str]] = []
    for name in names:
        attr = resolve_dataset(name, dataset_dir, info)
        if attr.file_name:
            out.append((name, Path(attr.file_name)))
        else:
            out.append((name, f"hub:{attr.hf_hub_url}|{attr.subset}|{attr.split}"))
    return out


def data_fingerprint(cfg: RunConfig) -> str:
    """A hash of the training data's bytes (every file of every dataset, in order) and of
    dataset_info.json, so an edited file reads as other data."""
    saved = tokenized.manifest(cfg.tokenized_path)
    if saved is not None:  # the rows trained are those saved from this data
        return str(saved["data_fingerprint"])
    digest = hashlib.sha256()
    info = Path(cfg.dataset_dir) / "dataset_info.json"
    sources = _dataset_paths(cfg, cfg.dataset_names)
    files = [info] if info.is_file() else []
    for name, where in sources:
        digest.update(json.dumps([name, str(where)]).encode())
        if isinstance(where, Path):
            files += sorted(p for p in where.rglob("*") if p.is_file()) if where.is_dir() else [where]
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run_inputs(cfg: RunConfig) -> list[tuple[str, Path]]:
    """(key, path) of every local file or folder the run reads."""
    found: list[tuple[str, Path]] = [("model_name_or_path", Path(cfg.model_name_or_path).expanduser())]
    found += [("adapter_name_or_path", Path(p).expanduser()) for p in cfg.adapter_paths]
    for key in ("ref_model", "reward_model"):
        value = getattr(cfg, key)
        if value:
            module, sep, function = value.partition(":")
            # `module:function` names Python code: the module's file is what the run reads.
            found.append((key, Path(module.replace(".", "/") + ".py")
                          if sep and function and not Path(value).exists() else Path(value)))
    if cfg.tokenized_path:
        found.append(("tokenized_path", Path(cfg.tokenized_path).expanduser()))
    if cfg.dataset and tokenized.manifest(cfg.tokenized_path) is None:
        found.append(("dataset_dir", Path(cfg.dataset_dir) / "dataset_info.json"))
        names = cfg.dataset_names + split_list(cfg.eval_dataset)
        found += [("dataset", where) for _, where in _dataset_paths(cfg, names)
                  if isinstance(where, Path)]
    return found
