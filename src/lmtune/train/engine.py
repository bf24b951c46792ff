"""The one training loop every stage shares (ppo runs its own around rollouts, reusing the parts).

A stage hands `fit` its model (with the method applied), its rows and an `Objective`: how rows
become a batch, the summed loss of a micro-batch with any metrics the stage reports, and how many
loss units (target tokens, pairs, ...) the batch holds. The loop does the rest, in the order it
reads here: optimizer and schedule, resume, then for each optimizer step one accumulation window of
micro-batches whose loss is normalised by the units in the WHOLE window (so batch 8 x accumulation 1
and 1 x 8 give the same gradients on rows of different lengths), clipping, the step, logs, eval and
checkpoints; at the end the model, results and loss plot.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from lmtune.config import RunConfig
from lmtune.data.batching import collate, micro_batches, steps_per_epoch
from lmtune.errors import ConfigError, RunInterrupted, TrainingError
from lmtune.models.methods import (check_untouched_4bit, count_parameters, evaluation,
                                   learning_rate_of, training_hooks)
from lmtune.train import checkpoint as ckpt
from lmtune.train.logs import PLOT_FILE, TrainerLog, plot_loss
from lmtune.train.results import write_results

Batch = dict[str, torch.Tensor]
# Metric name -> (sum over the batch, how many values were summed); logged as sum / count.
Metrics = dict[str, tuple[torch.Tensor | float, int]]


@dataclass
class Objective:
    """What a stage plugs into the loop."""

    loss: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, Metrics]]  # summed over loss units
    units: Callable[[Batch], int]  # loss units in the batch: the normaliser
    collate: Callable[[list[Any], int], Batch] = collate  # rows, pad id -> batch
    perplexity: bool = False  # also report exp(eval_loss): the loss is a mean token NLL


class MetricTotals:
    """Running sums of a stage's metrics between two log lines (or over an eval pass)."""

    def __init__(self, sums: dict[str, list[float]] | None = None):
        self.sums: dict[str, list[float]] = sums or {}

    def add(self, metrics: Metrics) -> None:
        for name, (total, count) in metrics.items():
            entry = self.sums.setdefault(name, [0.0, 0])
            entry[0] += float(total)
            entry[1] += count

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + name: round(total / count, 6)
                for name, (total, count) in self.sums.items() if count}


def _windows(n_rows: int, cfg: RunConfig) -> Iterator[list[list[int]]]:
    """The micro-batches (lists of row indices) of every optimizer step, epoch after epoch."""
    epoch = 0
    while True:
        batches = micro_batches(n_rows, cfg.per_device_train_batch_size, cfg.seed, epoch)
        for i in range(0, len(batches), cfg.gradient_accumulation_steps):
            yield batches[i: i + cfg.gradient_accumulation_steps]
        epoch += 1


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with one parameter group per (learning rate, decayed or not). The rate is the method's
    choice (LoRA+ gives B matrices their own); groups at learning_rate come first, so the logged lr
    is the base rate."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # Biases and norm weights are not decayed: shrinking them toward 0 only hurts.
            decay = not (param.ndim < 2 or "norm" in name.lower())
            groups.setdefault((learning_rate_of(name, cfg), decay), []).append(param)
    order = sorted(groups, key=lambda key: (key[0] != cfg.learning_rate, not key[1]))
    return torch.optim.AdamW(
        [{"params": groups[key], "lr": key[0], "weight_decay": cfg.weight_decay if key[1] else 0.0}
         for key in order],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


def evaluate(model, rows: list[Any], objective: Objective, cfg: RunConfig, pad_id: int,
             accelerator: Accelerator) -> dict[str, float]:
    """eval_loss (mean per unit over `rows`), the stage's metrics as eval_<name>, and
    eval_perplexity for token objectives."""
    total, units, metrics = 0.0, 0, MetricTotals()
    with evaluation(model), torch.no_grad():
        for i in range(0, len(rows), cfg.per_device_eval_batch_size):
            batch = _to(objective.collate(rows[i: i + cfg.per_device_eval_batch_size], pad_id),
                        accelerator)
            with accelerator.autocast():
                loss, batch_metrics = objective.loss(model, batch)
            total += loss.item()
            units += objective.units(batch)
            metrics.add(batch_metrics)
    result = {"eval_loss": round(total / max(units, 1), 6)} | metrics.means("eval_")
    if objective.perplexity:
        result["eval_perplexity"] = round(math.exp(min(result["eval_loss"], 50.0)), 4)
    return result


def _to(batch: Batch, accelerator: Accelerator) -> Batch:
    return {k: v.to(accelerator.device) for k, v in batch.items()}


def _check_finite_weights(model: torch.nn.Module, step: int) -> None:
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise TrainingError(f"step {step}: parameter {name} holds NaN/inf; nothing was saved.",
                                "lower learning_rate, or use bf16 instead of fp16.")


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn Ctrl-C / SIGTERM into a request that the loop honours after the current step."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def fit(cfg: RunConfig, model, tokenizer: PreTrainedTokenizerBase, train_rows: list[Any],
        eval_rows: list[Any], objective: Objective, output_dir: Path, resume_dir: Path | None,
        extra_results: dict[str, Any]) -> dict[str, Any]:
    """Train `model` on `train_rows`; write logs, checkpoints and the result into `output_dir`
    (already prepared by `checkpoint.prepare_run`), continuing from `resume_dir` if given."""
    if not cfg.do_train:
        print("do_train is false: data, model and method checked; nothing trained.")
        return {}
    # accelerate keeps its precision settings in a process-wide singleton; a second run in the same
    # process (tests, comparisons) may ask for another precision, so start from a clean state.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if cfg.fp16 and accelerator.device.type == "cpu":
        raise ConfigError("fp16 needs a GPU; this run is on the CPU.", "use bf16: true (or neither).")
    if accelerator.num_processes > 1:
        raise ConfigError("this version of lmtune trains in one process.",
                          "launch `lmtune train` directly, without torchrun/accelerate launch.")
    pad_id = tokenizer.pad_token_id

    # --- optimizer, schedule, length of the run ---------------------------------------------------
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("no parameter is trainable.", "check finetuning_type and its keys.")
    check_untouched_4bit(model)
    optimizer = build_optimizer(model, cfg)
    per_epoch = steps_per_epoch(len(train_rows), cfg.per_device_train_batch_size,
                                cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                              num_warmup_steps=cfg.warmup_for(total_steps), num_training_steps=total_steps)
    hooks = training_hooks(model, total_steps, output_dir)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if cfg.gradient_checkpointing:
        accelerator.unwrap_model(model).gradient_checkpointing_enable()
        accelerator.unwrap_model(model).enable_input_require_grads()

    # --- resume -----------------------------------------------------------------------------------
    state = {"global_step": 0, "tokens_seen": 0, "units_seen": 0, "loss_sum": 0.0}
    if resume_dir is not None:
        ckpt.load_weights(accelerator.unwrap_model(model), resume_dir)
        state = ckpt.load_training_state(resume_dir, optimizer, scheduler)
        print(f"resuming from {resume_dir} at step {state['global_step']}")
    log = TrainerLog(output_dir, resume_step=state["global_step"])
    windows = _windows(len(train_rows), cfg)
    for _ in range(state["global_step"]):  # replay the data order up to the resumed step
        next(windows)

    def save_weights(folder: Path, final: bool = False) -> None:
        unwrapped = accelerator.unwrap_model(model)
        _check_finite_weights(unwrapped, state["global_step"])
        hooks.save(unwrapped, folder, final)
        tokenizer.save_pretrained(folder)

    # The val split's metrics before the first update: the baseline every later eval is read
    # against (logged as step 0; all_results.json gets them as <name>_start).
    if eval_rows and cfg.eval_strategy != "no" and state["global_step"] == 0:
        log.write({"step": 0, "epoch": 0.0} | evaluate(model, eval_rows, objective, cfg, pad_id,
                                                       accelerator))

    # --- the loop ---------------------------------------------------------------------------------
    model.train()
    progress = tqdm(total=total_steps, initial=state["global_step"], desc="train", unit="step",
                    mininterval=1.0)
    # Sums since the last log line; checkpointed so a resumed run logs exactly the same numbers.
    interval = state.pop("log_interval", {"loss": 0.0, "units": 0, "tokens": 0})
    interval_metrics = MetricTotals(state.pop("log_metrics", None))
    interval_start = time.perf_counter()
    run_start, tokens_before = time.perf_counter(), state["tokens_seen"]
    with stop_requests() as stop_requested:
        for step in range(state["global_step"] + 1, total_steps + 1):
            window = next(windows)
            batches = [_to(objective.collate([train_rows[i] for i in rows], pad_id), accelerator)
                       for rows in window]
            window_units = sum(objective.units(b) for b in batches)
            step_loss, step_tokens = 0.0, 0
            for batch in batches:
                with accelerator.autocast():
                    loss, metrics = objective.loss(model, batch)
                interval_metrics.add(metrics)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"step {step}: the loss is {loss.item()}; training stopped. The newest "
                        f"checkpoint in {output_dir} is the last good state.",
                        "lower learning_rate, use bf16 rather than fp16, or check the data.")
                accelerator.backward(loss / window_units)
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
            hooks.before_step()
            grad_norm = float(accelerator.clip_grad_norm_(trainable,
                                                          cfg.max_grad_norm or float("inf")))
            if not math.isfinite(grad_norm):
                raise TrainingError(
                    f"step {step}: the gradient norm is {grad_norm}; training stopped.",
                    "lower learning_rate, use bf16 rather than fp16, or check the data.")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            hooks.after_step(step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            for totals, loss_key, units_key, tokens_key in (
                    (interval, "loss", "units", "tokens"),
                    (state, "loss_sum", "units_seen", "tokens_seen")):
                totals[loss_key] += step_loss
                totals[units_key] += window_units
                totals[tokens_key] += step_tokens
            state["global_step"] = step
            progress.update(1)

            record: dict[str, Any] = {}
            if step % cfg.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - interval_start
                record |= {"loss": round(interval["loss"] / interval["units"], 6), "lr": lr,
                           "grad_norm": round(grad_norm, 6),
                           "tokens_per_second": round(interval["tokens"] / elapsed, 2)}
                record |= interval_metrics.means()
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                interval = {"loss": 0.0, "units": 0, "tokens": 0}
                interval_metrics = MetricTotals()
                interval_start = time.perf_counter()
            end_of_epoch = step % per_epoch == 0
            if eval_rows and ((cfg.eval_strategy == "steps" and step % cfg.effective_eval_steps == 0)
                              or (cfg.eval_strategy == "epoch" and end_of_epoch)):
                record |= evaluate(model, eval_rows, objective, cfg, pad_id, accelerator)
            if record:
                log.write({"step": step, "epoch": round(step / per_epoch, 4)} | record)
            interrupted = bool(stop_requested) and step < total_steps
            if interrupted or (step % cfg.save_steps == 0 and step < total_steps):
                ckpt.save_checkpoint(output_dir, step, save_weights, optimizer, scheduler,
                                     state | {"log_interval": interval,
                                              "log_metrics": interval_metrics.sums},
                                     cfg.to_yaml_dict())
                ckpt.rotate_checkpoints(output_dir, cfg.save_total_limit)
            if interrupted:
                progress.close()
                raise RunInterrupted(
                    f"stopped at step {step} of {total_steps}; checkpoint-{step} saved in {output_dir}.",
                    "run the same command with resume_from_checkpoint=auto to continue.")
    progress.close()
    runtime = time.perf_counter() - run_start

    # --- the result -------------------------------------------------------------------------------
    save_weights(output_dir, final=True)
    results = {
        "train_loss": state["loss_sum"] / max(state["units_seen"], 1),
        "train_runtime": round(runtime, 2),
        "train_tokens": state["tokens_seen"],
        "train_tokens_per_second": round((state["tokens_seen"] - tokens_before) / max(runtime, 1e-9),
                                         2),
        "global_step": state["global_step"], "epoch": round(state["global_step"] / per_epoch, 4),
    }
    if eval_rows:
        results |= evaluate(model, eval_rows, objective, cfg, pad_id, accelerator)
        start = next((r for r in log.records if r["step"] == 0), {})
        results |= {f"{k}_start": v for k, v in start.items() if k.startswith("eval_")}
    trainable_count, total_count = count_parameters(accelerator.unwrap_model(model))
    results |= {"trainable_params": trainable_count, "total_params": total_count} | extra_results
    write_results(output_dir, results, cfg.to_yaml_dict())
    if cfg.plot_loss and plot_loss(log.records, output_dir / PLOT_FILE, f"{cfg.stage} / {cfg.finetuning_type}"):
        print(f"loss plot: {output_dir / PLOT_FILE}")
    return results
