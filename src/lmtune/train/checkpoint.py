"""Checkpoints that are either complete or ignored, and the output folder's safety rules.

A checkpoint is written into a hidden staging folder, flushed to disk, renamed to checkpoint-N and
only then marked complete. Resume reads only marked checkpoints, so a run killed mid-write leaves
nothing that could be picked up by mistake.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from lmtune.errors import ConfigError, TrainingError
from lmtune.models.scalar_head import HEAD_FILE, VALUE_HEAD_FILE, ScalarHeadModel

COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.yaml"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files only lmtune writes into an output folder; their presence makes a folder safe to overwrite.
_OUTPUT_SIGNS = (RUN_CONFIG, "trainer_log.jsonl", "all_results.json")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    """Each rank's random state (dropout differs per rank); rank 0's keeps the one-process name."""
    return "rng_state.pt" if rank == 0 else f"rng_state_{rank}.pt"


def save_checkpoint(output_dir: Path, step: int, save_weights, optimizer_state: dict[str, Any],
                    scheduler_state: dict[str, Any], rng_states: list[dict[str, Any]],
                    trainer_state: dict[str, Any], run_config: dict[str, Any]) -> Path:
    """Write checkpoint-`step` atomically (one process writes it, whatever the world size).
    `save_weights(folder)` writes the model in HF/PEFT format; `rng_states` holds every rank's."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_weights(staging)
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(scheduler_state, staging / "scheduler.pt")
        for rank, state in enumerate(rng_states):
            torch.save(state, staging / rng_file(rank))
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        (staging / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        (final / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainingError(f"could not write checkpoint-{step} in {output_dir}: {exc}",
                            "free disk space or fix permissions; the previous checkpoint is intact.") from exc
    return final


def complete_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    for path in output_dir.iterdir() if output_dir.is_dir() else []:
        match = _CHECKPOINT.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """resume_from_checkpoint: None, 'auto' (newest complete checkpoint) or a path."""
    if not resume:
        return None
    if resume == "auto":
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            raise ConfigError(f"resume_from_checkpoint: auto, but {output_dir} holds no complete "
                              "checkpoint.", "remove resume_from_checkpoint to start a new run.")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise ConfigError(f"resume_from_checkpoint: {resume} is not a complete lmtune checkpoint.",
                          "use 'auto' or a checkpoint-N folder written by lmtune train.")
    return path


def prepare_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to mix a new run into old results; clear only folders lmtune itself wrote."""
    if output_dir.is_dir() and any(output_dir.iterdir()) and not resuming:
        if not overwrite:
            raise ConfigError(f"output_dir {output_dir} is not empty.",
                              "set resume_from_checkpoint: auto to continue that run, or "
                              "overwrite_output_dir: true to start over (its contents are deleted).")
        if not any((output_dir / sign).exists() for sign in _OUTPUT_SIGNS) and \
                not any(_CHECKPOINT.match(p.name) for p in output_dir.iterdir()):
            raise ConfigError(f"output_dir {output_dir} holds files lmtune did not write; "
                              "overwrite_output_dir will not delete them.",
                              "choose a new or empty output_dir.")
        resolved, cwd = output_dir.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
            raise ConfigError(f"output_dir {output_dir} is the working folder, one of its parents, "
                              "or the home folder; overwrite_output_dir will not delete it.",
                              "use a dedicated folder such as saves/my-run.")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


# Keys that change what a run computes (gradient_accumulation_steps is checked at resume as part
# of the global batch, which may be split over another number of processes). Resuming with any of them changed would silently make a
# different run than the checkpoint belongs to; logging, saving and eval cadence may change freely.
RESUME_MUST_MATCH = (
    "model_name_or_path", "adapter_name_or_path", "template", "stage", "finetuning_type",
    "lora_target", "lora_rank", "lora_alpha", "lora_dropout", "freeze_trainable_layers",
    "freeze_trainable_modules", "dataset", "dataset_dir", "data_vars", "cutoff_len", "max_samples",
    "val_size", "per_device_train_batch_size", "learning_rate",
    "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
    "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "bf16", "fp16",
    "seed",
)


def check_resume_config(resume_dir: Path, run_config: dict[str, Any]) -> None:
    saved = saved_run_config(resume_dir)
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != run_config.get(k)]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {run_config.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume from {resume_dir}: the config changed what the run "
                          f"means ({details}).",
                          "restore those keys to resume, or start a new run in another output_dir.")


def prepare_run(output_dir: Path, resume: str | None, overwrite: bool,
                run_config: dict[str, Any]) -> Path | None:
    """Check the output folder before anything heavy loads; -> the checkpoint to resume, if any."""
    resume_dir = resolve_resume(output_dir, resume)
    if resume_dir is not None:
        check_resume_config(resume_dir, run_config)
    prepare_output_dir(output_dir, overwrite, resuming=resume_dir is not None)
    return resume_dir


def rotate_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints of this output_dir; -> those deleted."""
    if keep is None:
        return []
    root = output_dir.resolve()
    # A checkpoint-N that is a link to somewhere else is never followed out of output_dir.
    doomed = [p for p in complete_checkpoints(output_dir)[:-keep] if p.resolve().parent == root]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the trainable weights a checkpoint holds back into `model` (adapter or full model, and
    the scalar head of a reward model)."""
    if isinstance(model, ScalarHeadModel):
        load_weights(model.lm, folder)
        model.load_head(folder)
        return
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name in (HEAD_FILE, VALUE_HEAD_FILE):
            continue
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, param in model.named_parameters(remove_duplicate=False)} - \
        {name for name, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise TrainingError(f"checkpoint {folder} does not match the model "
                            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}).",
                            "resume with the model and method the checkpoint was written with.")


def _load_tensors(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a checkpoint cannot run code."""
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"cannot read {path}: {str(exc).splitlines()[0]}",
                            "resume from another checkpoint; lmtune loads only files it wrote "
                            "(tensors and plain values, never arbitrary objects).") from None


def load_optimizer_state(folder: Path) -> dict[str, Any]:
    return _load_tensors(folder / "optimizer.pt")


def load_training_state(folder: Path, optimizer, scheduler, rank: int = 0,
                        load_optimizer: bool = True) -> dict[str, Any]:
    """Optimizer (unless a sharded engine loaded it already), schedule, this rank's RNG and the
    loop's state."""
    if load_optimizer:
        optimizer.load_state_dict(load_optimizer_state(folder))
    scheduler.load_state_dict(_load_tensors(folder / "scheduler.pt"))
    # A rank the checkpoint's run did not have (more processes now) continues from rank 0's state.
    own = folder / rng_file(rank)
    restore_rng_state(_load_tensors(own if own.is_file() else folder / rng_file(0)))
    return json.loads((folder / TRAINER_STATE).read_text())


def saved_run_config(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / RUN_CONFIG).read_text())
