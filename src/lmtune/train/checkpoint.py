"""Checkpoints and final outputs that are either complete or refused, and the output folder's rules.

A checkpoint is written into a hidden staging folder, flushed to disk, renamed to checkpoint-N and
only then marked complete. Resume reads only marked checkpoints, so a run killed mid-write leaves
nothing that could be picked up by mistake. The final model is staged the same way and the output
folder gets FINAL_MARKER last; chat and export refuse a run folder without it.

RUN_MARKER is a file only lmtune writes, naming the run: `overwrite_output_dir` deletes a folder
only when it carries one, so a model, a LLaMA-Factory output or anything else is never deleted.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from lmtune.config import RunConfig
from lmtune.durable import fsync_path, replace_folder, write_file, writing
from lmtune.errors import ConfigError, ModelError, TrainingError
from lmtune.models.scalar_head import HEAD_FILE, VALUE_HEAD_FILE, ScalarHeadModel
from lmtune.train.fingerprint import changed_keys, data_fingerprint, run_inputs

COMPLETE_MARKER = "checkpoint_complete.json"
RUN_MARKER = "lmtune_run.json"
FINAL_MARKER = "lmtune_complete.json"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.yaml"
# FSDP2's checkpoints: each rank's shards of the trainable weights and the optimizer state,
# written by torch.distributed.checkpoint (one .distcp file per rank plus .metadata).
SHARDS = "fsdp_shards"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_FINAL_STAGING = ".final.staging"


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


def _kept(output_dir: Path) -> str:
    checkpoints = complete_checkpoints(output_dir)
    if checkpoints:
        return (f"Kept: {checkpoints[-1]}, the newest complete checkpoint; resume from it with "
                "resume_from_checkpoint=auto.")
    return f"No complete checkpoint of this run exists in {output_dir}."


def _staging(output_dir: Path, step: int) -> Path:
    return output_dir / f".checkpoint-{step}.staging"


def open_staging(output_dir: Path, step: int) -> Path:
    """An empty staging folder for checkpoint-`step`, for every rank to write its shards into
    before `save_checkpoint(..., staged=True)` completes it."""
    staging = _staging(output_dir, step)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:  # an LmtuneError reaches every rank; others would wait for rank 0
        raise TrainingError(f"cannot create {staging}: {exc.strerror or exc}",
                            "check output_dir's permissions and free space, then resume.") from None
    return staging


def save_sharded(state: dict[str, Any], staging: Path) -> None:
    """Every rank writes its shards of `state` (all ranks call it)."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(state, checkpoint_id=staging / SHARDS)
    except OSError as exc:
        raise TrainingError(f"cannot write the shards of {staging.name.strip('.')}: "
                            f"{exc.strerror or exc}", "free disk space or check output_dir's "
                            "permissions, then resume.") from None


def is_sharded(folder: Path) -> bool:
    return (folder / SHARDS).is_dir()


def load_sharded(state: dict[str, Any], folder: Path) -> None:
    """Fill `state` in place from the checkpoint's shards, in `state`'s own layout (all ranks)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():
            # One process reading shards is intended here (re-sharding), not a forgotten init.
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=folder / SHARDS)
    except (OSError, RuntimeError, ValueError) as exc:
        raise TrainingError(f"cannot read the shards in {folder}: {str(exc).splitlines()[0]}",
                            "resume with the model and method the checkpoint was written "
                            "with, or from another checkpoint.") from None


def save_checkpoint(output_dir: Path, step: int, save_weights,
                    optimizer_state: dict[str, Any] | None, scheduler_state: dict[str, Any],
                    rng_states: list[dict[str, Any]], trainer_state: dict[str, Any],
                    run_config: dict[str, Any], staged: bool = False) -> Path:
    """Write checkpoint-`step` atomically (one process writes it, whatever the world size).
    `save_weights(folder)` writes the model in HF/PEFT format; `rng_states` holds every rank's.
    `staged`: the ranks already wrote their shards (weights and optimizer) into `open_staging`'s
    folder, and `optimizer_state` is None."""
    final = output_dir / f"checkpoint-{step}"
    staging = _staging(output_dir, step)
    if not staged:
        shutil.rmtree(staging, ignore_errors=True)
    kept = _kept(output_dir)
    try:
        with writing(f"checkpoint-{step}", final, kept):
            staging.mkdir(parents=True, exist_ok=staged)
            save_weights(staging)
            if optimizer_state is not None:
                torch.save(optimizer_state, staging / "optimizer.pt")
            torch.save(scheduler_state, staging / "scheduler.pt")
            for rank, state in enumerate(rng_states):
                torch.save(state, staging / rng_file(rank))
            (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
            (staging / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
            if (output_dir / RUN_MARKER).is_file():  # the data fingerprint resume compares
                shutil.copyfile(output_dir / RUN_MARKER, staging / RUN_MARKER)
            replace_folder(staging, final)
            write_file(final / COMPLETE_MARKER, json.dumps({"step": step}), f"checkpoint-{step}'s marker")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def save_final(output_dir: Path, write_fn: Callable[[Path], None]) -> None:
    """Write the final model: `write_fn(folder)` writes weights and tokenizer into a staging folder,
    which is flushed and moved into output_dir entry by entry. FINAL_MARKER is removed first and
    written by `mark_complete` last, so an output_dir without it never passes for a finished run."""
    (output_dir / FINAL_MARKER).unlink(missing_ok=True)
    staging = output_dir / _FINAL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    kept = ("output_dir holds no complete final model (chat and export refuse it). "
            + _kept(output_dir))
    try:
        with writing("the final model", output_dir, kept):
            staging.mkdir()
            write_fn(staging)
            for path in staging.rglob("*"):
                if path.is_file():
                    fsync_path(path)
            for entry in sorted(staging.iterdir()):
                target = output_dir / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
            fsync_path(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def mark_complete(output_dir: Path) -> None:
    write_file(output_dir / FINAL_MARKER, json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}),
               "the completion marker", f"The model in {output_dir} is written but not marked "
               "complete; run again to finish it.")


def require_complete_output(folder: Path) -> None:
    """Refuse a run folder whose run did not finish: its model files may be partial or missing,
    and using them (or quietly using the base model instead) would answer with another model."""
    if (folder / RUN_MARKER).is_file() and not (folder / FINAL_MARKER).is_file():
        checkpoints = complete_checkpoints(folder)
        use = (f"use a checkpoint (adapter_name_or_path: {checkpoints[-1]} for an adapter run), "
               if checkpoints else "")
        raise ModelError(f"{folder} holds an lmtune run that did not finish (no {FINAL_MARKER}): "
                         "its model may be partial or missing.",
                         f"finish it with resume_from_checkpoint=auto, {use}or pass --base for the "
                         "base model.")


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


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_inputs_outside(output_dir: Path, cfg: RunConfig, resume_dir: Path | None) -> None:
    """Nothing a run reads may lie in the folder it writes (and may delete): a base model or data
    set inside output_dir would be overwritten by the run's own files."""
    inputs = run_inputs(cfg)
    if resume_dir is not None and not (_CHECKPOINT.match(resume_dir.name)
                                       and resume_dir.resolve().parent == output_dir.resolve()):
        inputs.append(("resume_from_checkpoint", resume_dir))  # only output_dir's own checkpoints
    for key, path in inputs:
        if path.exists() and _inside(path, output_dir):
            raise ConfigError(f"{key}: {path} lies inside output_dir {output_dir}; the run would "
                              "write over it (and overwrite_output_dir would delete it).",
                              "choose an output_dir of its own, e.g. saves/my-run.")


def prepare_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to mix a new run into old results; delete only folders carrying RUN_MARKER."""
    if output_dir.is_dir() and any(output_dir.iterdir()) and not resuming:
        if not overwrite:
            raise ConfigError(f"output_dir {output_dir} is not empty.",
                              "set resume_from_checkpoint: auto to continue that run, or "
                              "overwrite_output_dir: true to start over (its contents are deleted).")
        if not (output_dir / RUN_MARKER).is_file():
            raise ConfigError(f"output_dir {output_dir} was not written by an lmtune run (it has no "
                              f"{RUN_MARKER}); overwrite_output_dir deletes only folders lmtune "
                              "wrote, so it deletes nothing here.",
                              "choose a new or empty output_dir, or move the folder away yourself.")
        shutil.rmtree(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir {output_dir} cannot be created: {exc.strerror or exc}",
                          "choose a folder you can write, e.g. saves/my-run.") from None


def check_resume(resume_dir: Path, run_config: dict[str, Any], data_fp: str) -> None:
    saved = saved_run_config(resume_dir)
    changed = changed_keys(saved, run_config)
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {run_config.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume from {resume_dir}: the config changed what the run "
                          f"means ({details}).",
                          "restore those keys to resume, or start a new run in another output_dir.")
    marker = resume_dir / RUN_MARKER
    recorded = json.loads(marker.read_text()).get("data_fingerprint") if marker.is_file() else None
    if recorded is not None and recorded != data_fp:
        raise ConfigError(f"cannot resume from {resume_dir}: the contents of the data files "
                          "changed since that checkpoint was written (same names, other data).",
                          "restore the data to resume, or start a new run in another output_dir.")


def prepare_run(cfg: RunConfig) -> Path | None:
    """Check the output folder and the inputs before anything heavy loads; mark the folder as an
    lmtune run's; -> the checkpoint to resume, if any."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder.",
                          "choose a folder path, e.g. saves/my-run.")
    resolved, cwd = output_dir.resolve(), Path.cwd().resolve()
    if cfg.overwrite_output_dir and (resolved == cwd or resolved in cwd.parents
                                     or resolved == Path.home().resolve()):
        raise ConfigError(f"output_dir {output_dir} is the working folder, one of its parents, "
                          "or the home folder; overwrite_output_dir will not delete it.",
                          "use a dedicated folder such as saves/my-run.")
    resume_dir = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    check_inputs_outside(output_dir, cfg, resume_dir)
    run_config = cfg.to_yaml_dict()
    data_fp = data_fingerprint(cfg)
    if resume_dir is not None:
        check_resume(resume_dir, run_config, data_fp)
    prepare_output_dir(output_dir, cfg.overwrite_output_dir, resuming=resume_dir is not None)
    (output_dir / FINAL_MARKER).unlink(missing_ok=True)
    write_file(output_dir / RUN_MARKER,
               json.dumps({"run": f"lmtune train, stage {cfg.stage}, {cfg.model_name_or_path}",
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "data_fingerprint": data_fp}, indent=2),
               "the run marker")
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
