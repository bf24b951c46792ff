"""The training loop every stage shares, and the pieces ppo's own loop calls too.

A stage hands `fit` its model (with the method applied), its rows and an `Objective`: how rows
become a batch, the summed loss of a micro-batch with any metrics the stage reports, and how many
loss units (target tokens, pairs, ...) the batch holds. `fit` reads top to bottom: set up (the
`Trainer`: accelerator, optimizer, schedule, method hooks, resume), then for each optimizer step one
accumulation window of micro-batches whose loss is normalised by the units in the WHOLE window (so
batch 8 x accumulation 1 and 1 x 8 give the same gradients on rows of different lengths), the step
with its finite checks, logs and eval on their own cadences, checkpoint-or-stop; at the end the
model, results and loss plot.

ppo runs rollouts between its updates, so it has its own loop in ppo.py, built from the same pieces
(`Trainer`, `is_log_step`, `is_eval_step`, `checkpoint_or_stop`, `finish`): a guard added here holds
for every stage.

Several processes (torchrun, accelerate launch, --nproc) run the same loop; what differs lives in
the pieces and in lmtune.distributed: each rank takes its share of every step's window, the loss is
normalised by the units of the window on ALL ranks (so N ranks make the same update as one process
with the same global batch), the model is wrapped by accelerate (DDP), sharded by torch's
fully_shard (FSDP2) or partitioned by DeepSpeed's ZeRO engine (lmtune.train.zero), and only rank 0
writes logs, checkpoints and the output (FSDP2 and ZeRO: each rank writes its own shards of a
checkpoint).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from lmtune import distributed as dist
from lmtune.config import RunConfig
from lmtune.data.batching import collate, group_by_length, micro_batches, steps_per_epoch
from lmtune.data.streaming import RowStream
from lmtune.errors import ConfigError, RunInterrupted, TrainingError
from lmtune.models.gated_mlp import keep_less_in_gated_mlps
from lmtune.models.lora_inputs import pass_half_inputs_as_they_are
from lmtune.models.recompute import recomputing_cheap_outputs, tag_norm_outputs
from lmtune.models.shared_mask import share_attention_masks
from lmtune.models.load import grouped_kv_on_cpu
from lmtune.models.methods import (TrainingHooks, check_untouched_4bit, count_parameters,
                                   evaluation, training_hooks)
from lmtune.allocator import active_allocator
from lmtune.train import checkpoint as ckpt
from lmtune.train import zero
from lmtune.train.best import BestEvaluation
from lmtune.train.logs import GENERATION_METRICS, PLOT_FILE, TrainerLog, plot_loss
from lmtune.train.optim import LayerwiseOptimizer, build_optimizer
from lmtune.train.trackers import open_trackers
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
    # A row's padded length, for a loss that sums each row's own terms (where regrouping a step's
    # rows across its micro-batches changes no number): with group_by_length the loop groups them
    # by it (data/batching.group_by_length). None: micro-batches always as drawn.
    length: Callable[[Any], int] | None = None


class MetricTotals:
    """Running sums of a stage's metrics between two log lines (or over an eval pass)."""

    def __init__(self, sums: dict[str, list[float]] | None = None):
        self.sums: dict[str, list[float]] = sums or {}

    def add(self, metrics: Metrics) -> None:
        for name, (total, count) in metrics.items():
            entry = self.sums.setdefault(name, [0.0, 0])
            entry[0] += float(total)
            entry[1] += count

    def add_sums(self, sums: dict[str, list[float]]) -> None:
        for name, (total, count) in sums.items():
            entry = self.sums.setdefault(name, [0.0, 0])
            entry[0] += total
            entry[1] += count

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + name: round(total / count, 6)
                for name, (total, count) in self.sums.items() if count}


def _windows(n_rows: int, cfg: RunConfig) -> Iterator[list[list[int]]]:
    """The micro-batches (lists of row indices) of every optimizer step on all ranks together,
    epoch after epoch: accumulation x world size micro-batches per step."""
    per_step = cfg.gradient_accumulation_steps * dist.world_size()
    epoch = 0
    while True:
        batches = micro_batches(n_rows, cfg.per_device_train_batch_size, cfg.seed, epoch,
                                shuffle=not cfg.disable_shuffling)
        for i in range(0, len(batches), per_step):
            yield batches[i: i + per_step]
        epoch += 1


def _row_windows(train_rows: list[Any] | RowStream, cfg: RunConfig) -> Iterator[list[list[Any]]]:
    """The rows of every optimizer step's micro-batches, all ranks together; a streaming run's
    come from its stream, in the order its seed decides."""
    if isinstance(train_rows, RowStream):
        yield from train_rows.windows(cfg.gradient_accumulation_steps * dist.world_size())
        return
    for window in _windows(len(train_rows), cfg):
        yield [[train_rows[i] for i in rows] for rows in window]


def evaluate(trainer: Trainer, rows: list[Any], objective: Objective, pad_id: int) -> dict[str, float]:
    """eval_loss (mean per unit over `rows`), the stage's metrics as eval_<name>, and
    eval_perplexity for token objectives. Every rank evaluates all of `rows` (sharded engines
    need every rank in each forward), so each rank's numbers are the whole split's."""
    cfg = trainer.cfg
    total, units, metrics = 0.0, 0, MetricTotals()
    with evaluation(trainer.model), torch.no_grad():
        for i in range(0, len(rows), cfg.per_device_eval_batch_size):
            batch = trainer.to_device(
                objective.collate(rows[i: i + cfg.per_device_eval_batch_size], pad_id))
            with trainer.autocast():
                loss, batch_metrics = trainer.forward(objective.loss, batch)
            total += loss.item()
            units += objective.units(batch)
            metrics.add(batch_metrics)
    result = {"eval_loss": round(total / max(units, 1), 6)} | metrics.means("eval_")
    if objective.perplexity:
        result["eval_perplexity"] = round(math.exp(min(result["eval_loss"], 50.0)), 4)
    return result


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


# --- the length of a run -------------------------------------------------------------------------

@dataclass
class Schedule:
    """How long a run is, as its loop counts (fit: optimizer steps; ppo: iterations). `lmtune plan`
    reads the same numbers, so what it predicts is what trains."""

    rows_per_step: int  # rows one loop step consumes
    per_epoch: int  # loop steps per epoch (a shorter last window still steps); 0: not known (streaming)
    total: int  # loop steps of the run: max_steps, else epochs x per_epoch
    optimizer_steps: int  # what the learning-rate schedule counts

    @property
    def epochs(self) -> float:
        return round(self.total / self.per_epoch, 3) if self.per_epoch else 0.0


def schedule(cfg: RunConfig, n_rows: int | None, world_size: int | None = None) -> Schedule:
    """The run's length for `world_size` processes (default: this job's): each optimizer step
    takes per_device_train_batch_size x gradient_accumulation_steps rows on every rank. n_rows None:
    a streaming run, whose rows are not known up front, runs max_steps (which it requires)."""
    world = world_size or dist.world_size()
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    if cfg.stage == "ppo":
        # An iteration answers ppo_buffer_size batches of prompts, then trains each batch
        # ppo_epochs times, one optimizer step per pass; a short last batch of prompts is dropped.
        rows = batch * cfg.ppo_buffer_size
        per_epoch = max(1, n_rows // rows)
        updates_per_step = cfg.ppo_epochs * cfg.ppo_buffer_size
    elif n_rows is None:
        return Schedule(batch, 0, cfg.max_steps, cfg.max_steps)
    else:
        rows = batch
        per_epoch = steps_per_epoch(n_rows, cfg.per_device_train_batch_size,
                                    cfg.gradient_accumulation_steps * world)
        updates_per_step = 1
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
    return Schedule(rows, per_epoch, total, total * updates_per_step)


def is_log_step(cfg: RunConfig, step: int, total: int) -> bool:
    return step % cfg.logging_steps == 0 or step == total or (cfg.logging_first_step and step == 1)


def is_save_step(cfg: RunConfig, step: int, plan: Schedule) -> bool:
    """A checkpoint on save_strategy's cadence; the last step saves the run's output instead."""
    if step >= plan.total:
        return False
    if cfg.save_strategy == "steps":
        return step % cfg.save_steps == 0
    return cfg.save_strategy == "epoch" and step % plan.per_epoch == 0


def is_eval_step(cfg: RunConfig, step: int, plan: Schedule) -> bool:
    """Mid-run evaluation, on its own cadence (independent of logging_steps)."""
    if cfg.eval_strategy == "steps":
        return step % cfg.effective_eval_steps == 0
    return cfg.eval_strategy == "epoch" and step % plan.per_epoch == 0


# --- the parts of one update ------------------------------------------------------------------------

class LossModule(torch.nn.Module):
    """The model with the loss as its forward. Engines that wrap a model (DDP, FSDP2, DeepSpeed)
    act in the wrapper's forward (DDP arms its gradient all-reduce there, FSDP2 gathers the shards
    there), while the stages' losses call into the model's parts (decoder, head); running the whole
    loss inside one forward keeps every such call inside the engine's."""

    def __init__(self, model: torch.nn.Module, recompute_cheap_outputs: bool):
        super().__init__()
        self.model = model
        self.recompute_cheap_outputs = recompute_cheap_outputs

    def forward(self, loss_fn: Callable[[torch.nn.Module, Batch], Any], batch: Batch) -> Any:
        if not self.recompute_cheap_outputs:
            return loss_fn(self.model, batch)
        with recomputing_cheap_outputs():
            return loss_fn(self.model, batch)


@dataclass
class Trainer:
    """What every loop's updates share, set up once by `prepare_trainer`: the accelerator
    (device, mixed precision, the multi-process engine), the model (`model`: the model itself;
    `wrapped`: the engine's wrapper, through which losses run), optimizer and schedule, the
    method's hooks. Its methods are the guarded steps: no update, checkpoint or save skips a check."""

    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    scheduler: Any
    hooks: TrainingHooks
    output_dir: Path
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    wrapped: torch.nn.Module | None = None
    engine: str = "single"  # distributed.engine(): single, ddp, fsdp2 or deepspeed

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model

    def forward(self, loss_fn: Callable[[torch.nn.Module, Batch], Any], batch: Batch) -> Any:
        """`loss_fn(model, batch)` run through the engine's wrapper."""
        return self.wrapped(loss_fn, batch)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer accelerate's wrapper holds (torch's state-dict helpers want that one)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """FSDP2 and ZeRO-3: the full weights gathered from every rank onto rank 0 (all ranks call
        it; the others get an empty dict); else None, and the model's own parameters are whole."""
        if self.engine == "deepspeed":
            return zero.whole_state(self.wrapped, self.unwrapped)
        if self.engine != "fsdp2":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.wrapped, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        # A tied weight (lm_head = embeddings) comes back gathered twice; the HF format keeps one.
        model = self.unwrapped
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - \
            {n for n, _ in model.named_parameters()}
        return {k.removeprefix("model."): v for k, v in state.items()
                if k.removeprefix("model.") not in tied}

    def sharded_state(self) -> dict[str, Any]:
        """The trainable weights and the optimizer state by parameter name, as this rank holds
        them (FSDP2: its shards), for torch.distributed.checkpoint to save or load in place."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        return {"model": get_model_state_dict(self.wrapped, options=StateDictOptions(
                    ignore_frozen_params=True)),
                "optimizer": get_optimizer_state_dict(self.wrapped, self.torch_optimizer)}

    def gradient_sync(self, sync: bool):
        """Around a micro-batch's forward and backward: all-reduce (DDP) its gradients (the
        window's last micro-batch on this rank) or only accumulate them. FSDP2 reduce-scatters
        every micro-batch: holding whole unsynced gradients would undo its memory saving, and the
        sum of the shards' gradients is the same. DeepSpeed learns whether this is the window's
        last micro-batch, the boundary its engine steps at."""
        if self.engine == "deepspeed":
            self.wrapped.set_gradient_accumulation_boundary(sync)
        if sync or self.engine in ("fsdp2", "deepspeed"):
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.wrapped)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def autocast(self):
        return self.accelerator.autocast()

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def backward(self, loss: torch.Tensor, where: str, scale: float = 1.0) -> float:
        """Backpropagate `loss * scale` after checking the loss is finite; -> the loss's value."""
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"{where}: the loss is {value}; training stopped. The newest checkpoint in "
                f"{self.output_dir} is the last good state.",
                "lower learning_rate, use bf16 rather than fp16, or check the data.")
        if self.engine == "deepspeed":  # the scale already divides by the window's units
            self.wrapped.backward(loss * scale, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss * scale)
        return value

    def optimizer_step(self, update: int, where: str) -> tuple[float, float]:
        """Optimizer step number `update` (1-based): clip, check the gradient is finite, step the
        optimizer and the schedule, with the method's hooks around it. -> (learning rate used,
        gradient norm before clipping)."""
        self.hooks.before_step()
        if self.engine == "deepspeed":
            return self._deepspeed_step(update, where)
        if isinstance(self.torch_optimizer, LayerwiseOptimizer):  # the weights moved in backward
            grad_norm = self.torch_optimizer.grad_norm()
        else:
            grad_norm = self.accelerator.clip_grad_norm_(self.trainable,
                                                         self.cfg.max_grad_norm or float("inf"))
            if isinstance(grad_norm, DTensor):  # FSDP2: each rank holds a partial norm
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            raise TrainingError(f"{where}: the gradient norm is {grad_norm}; training stopped.",
                                "lower learning_rate, use bf16 rather than fp16, or check the data.")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.hooks.after_step(update)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, grad_norm

    def _deepspeed_step(self, update: int, where: str) -> tuple[float, float]:
        """DeepSpeed reduces, clips and steps inside its engine, and only then knows the norm: a
        non-finite one stops the run before anything of the changed weights is written."""
        lr = self.scheduler.get_last_lr()[0]
        self.wrapped.step()
        grad_norm = float(self.wrapped.get_global_grad_norm())
        if not math.isfinite(grad_norm):
            raise TrainingError(f"{where}: the gradient norm is {grad_norm}; training stopped "
                                "(nothing after the last checkpoint is saved).",
                                "lower learning_rate, use bf16 rather than fp16, or check the data.")
        self.hooks.after_step(update)
        self.scheduler.step()
        return lr, grad_norm

    def save_weights(self, folder: Path, final: bool = False) -> None:
        """The model or adapter (HF/PEFT format) and tokenizer, written by rank 0; never weights
        holding NaN/inf. Every rank calls it (a sharded engine gathers the weights first)."""
        model = self.unwrapped
        # Each rank checks what it holds (FSDP2, ZeRO-3: its shards), and all learn of any bad value.
        bad = [name for name, param in model.named_parameters() if param.requires_grad and not
               torch.isfinite(param.to_local() if isinstance(param, DTensor)
                              else zero.local_values(param)).all()]
        bad = [name for names in dist.gather(bad) for name in names]
        if bad:
            raise TrainingError(f"parameter {bad[0]} holds NaN/inf; nothing was saved.",
                                "lower learning_rate, or use bf16 instead of fp16.")

        weights = self.model_state()

        def into(target: Path) -> None:
            self.hooks.save(model, target, final, weights)
            self.tokenizer.save_pretrained(target)

        # The run's output is staged, flushed and moved in; write_results marks it complete last.
        dist.on_main(ckpt.save_final, folder, into) if final else dist.on_main(into, folder)

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """checkpoint-`step` with every rank's random state, written once (by rank 0). FSDP2:
        every rank first writes its own shards of the weights and optimizer into the staging
        folder (torch.distributed.checkpoint), and the whole weights are gathered in HF/PEFT
        format only with state_dict_type FULL_STATE_DICT. DeepSpeed: every rank writes its
        partitions there, and the checkpoint also holds the whole trained weights in HF/PEFT
        format (usable as an adapter or model)."""
        rng_states = dist.gather(ckpt.rng_state())
        sharded = self.engine in ("fsdp2", "deepspeed")
        full = self.engine != "fsdp2" or \
            dist.fsdp_settings(self.cfg)["state_dict_type"] == "FULL_STATE_DICT"
        weights = self.model_state() if full else None
        if sharded:
            staging = dist.on_main(ckpt.open_staging, self.output_dir, step)
            if self.engine == "deepspeed":
                zero.save(self.wrapped, staging)
            else:
                ckpt.save_sharded(self.sharded_state(), staging)

        def write() -> None:
            ckpt.save_checkpoint(self.output_dir, step, lambda folder: (
                full and self.hooks.save(self.unwrapped, folder, False, weights),
                self.tokenizer.save_pretrained(folder)),
                None if sharded else self.optimizer.state_dict(),
                self.scheduler.state_dict(), rng_states, state, self.cfg.to_yaml_dict(),
                staged=sharded)
            ckpt.rotate_checkpoints(self.output_dir, self.cfg.save_total_limit)

        dist.on_main(write)

    @property
    def global_batch(self) -> int:
        return (self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps
                * dist.world_size())

    def resume(self, resume_dir: Path | None, fresh_state: dict[str, Any]) -> dict[str, Any]:
        """Weights, optimizer, schedule and RNG from `resume_dir`; -> the loop's saved state.
        Another number of processes may resume it when the global batch is the same (each rank
        holds the whole state; the data order depends on the global window only)."""
        if resume_dir is None:
            return fresh_state | {"global_batch": self.global_batch}
        saved = ckpt.saved_run_config(resume_dir)
        state = json.loads((resume_dir / ckpt.TRAINER_STATE).read_text())
        saved_batch = state.get("global_batch", saved["per_device_train_batch_size"]
                                * saved.get("gradient_accumulation_steps", 1))
        if saved_batch != self.global_batch:
            raise ConfigError(
                f"cannot resume from {resume_dir}: it was trained with a global batch of "
                f"{saved_batch} rows per step, and this run has {self.global_batch} "
                f"(per_device_train_batch_size {self.cfg.per_device_train_batch_size} x "
                f"gradient_accumulation_steps {self.cfg.gradient_accumulation_steps} x "
                f"{dist.world_size()} processes).",
                "choose gradient_accumulation_steps (or the number of processes) so the product "
                f"is {saved_batch} again.")
        partitions = zero.is_checkpoint(resume_dir)
        if partitions or self.engine == "deepspeed":
            self._load_partitions(resume_dir, partitions)
        elif ckpt.is_sharded(resume_dir):
            self._load_shards(resume_dir)
        elif self.engine == "fsdp2":
            self._load_whole_into_shards(resume_dir)
        else:
            ckpt.load_weights(self.unwrapped, resume_dir)
        state = ckpt.load_training_state(resume_dir, self.optimizer, self.scheduler, dist.rank(),
                                         load_optimizer=not ckpt.is_sharded(resume_dir)
                                         and self.engine in ("single", "ddp"))
        print(f"resuming from {resume_dir} at step {state['global_step']}")
        return state | {"global_batch": self.global_batch}

    def _load_partitions(self, resume_dir: Path, partitions: bool) -> None:
        """DeepSpeed's partitions, into the same ZeRO stage on as many ranks; a checkpoint of
        whole weights cannot seed ZeRO's partitioned master copies and optimizer state."""
        if not partitions:
            raise ConfigError(
                f"cannot resume from {resume_dir} under deepspeed: it was written without "
                "DeepSpeed, and its optimizer state is not in ZeRO's partitions.",
                "resume it without deepspeed, or start a new run from its weights "
                f"(adapter_name_or_path: {resume_dir} for an adapter).")
        if self.engine == "deepspeed":
            zero.load(self.wrapped, resume_dir)
        else:
            zero.check_layout(resume_dir, None)

    def _load_shards(self, resume_dir: Path) -> None:
        """A checkpoint of FSDP2 shards: torch.distributed.checkpoint reads into whatever layout
        this run holds (FSDP2 on any number of ranks, DDP, one process), so it re-shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state = self.sharded_state()
        ckpt.load_sharded(state, resume_dir)
        set_model_state_dict(self.wrapped, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(self.wrapped, self.torch_optimizer, state["optimizer"])

    def _load_whole_into_shards(self, resume_dir: Path) -> None:
        """FSDP2 from a checkpoint of whole weights (DDP, one process, FULL_STATE_DICT): the
        weights and optimizer state, split over this job's ranks."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        whole = torch.nn.Module()
        whole.model = _whole_copy(self.unwrapped)
        ckpt.load_weights(whole.model, resume_dir)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.wrapped, whole.state_dict(), options=options)
        set_optimizer_state_dict(self.wrapped, self.torch_optimizer,
                                 ckpt.load_optimizer_state(resume_dir), options=options)


def _whole_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of a sharded model with whole (gathered) parameters, to load a checkpoint into."""
    import copy

    clone = copy.deepcopy(model).to("cpu")
    for module in clone.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                setattr(module, name, torch.nn.Parameter(param.full_tensor(), param.requires_grad))
    return clone


def enable_gradient_checkpointing(model: torch.nn.Module, every_n_layers: int = 1) -> None:
    """Recompute every `every_n_layers`-th decoder layer in backward (transformers' non-reentrant
    checkpointing)."""
    lm = getattr(model, "lm", model)  # a reward or value model checkpoints its LM
    lm.activation_checkpointing_enable(every_n_layers=every_n_layers)
    # With a frozen embedding no input of the first block needs a gradient, and the recomputed
    # blocks would then have nothing to backpropagate through.
    lm.enable_input_require_grads()


def add_neftune_noise(model: torch.nn.Module, alpha: float) -> None:
    """NEFTune: while the model trains, uniform noise in [-m, m], m = alpha / sqrt(L x d), on the
    input embeddings of a batch of L positions of width d. Eval passes and generation (eval mode)
    see the embeddings unchanged."""
    def noisy(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[1] * output.shape[2])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    model.get_input_embeddings().register_forward_hook(noisy)


def prepare_trainer(cfg: RunConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                    output_dir: Path, optimizer_steps: int) -> Trainer:
    """Accelerator, optimizer, learning-rate schedule and method hooks for a run of
    `optimizer_steps` updates; the model moves to the run's device."""
    # accelerate keeps its precision settings in a process-wide singleton; a second run in the same
    # process (tests, comparisons) may ask for another precision, so start from a clean state.
    AcceleratorState._reset_state(reset_partial_state=False)
    # broadcast_buffers off: the buffers (rotary tables) are not trained, and DDP's per-forward
    # broadcast would need every rank to run the same number of forwards.
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=bool(cfg.ddp_find_unused_parameters), broadcast_buffers=False)
    # split_batches: the schedule counts global optimizer steps (lmtune shards the data itself),
    # so the prepared scheduler steps once per optimizer step, not once per rank.
    engine = dist.engine(cfg)
    with dist.accelerate_without_engines():
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                  cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp],
                                  dataloader_config=DataLoaderConfiguration(split_batches=True))
    if cfg.fp16 and accelerator.device.type == "cpu":
        raise ConfigError("fp16 needs a GPU; this run is on the CPU.", "use bf16: true (or neither).")
    if accelerator.device.type == "cpu":
        grouped_kv_on_cpu()
    if cfg.pure_bf16:
        model.to(torch.bfloat16)  # the adapter too: peft keeps adapters in fp32 otherwise
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("no parameter is trainable.", "check finetuning_type and its keys.")
    check_untouched_4bit(model)
    keep_less_in_gated_mlps(model)
    pass_half_inputs_as_they_are(model)
    share_attention_masks(model)
    hooks = training_hooks(getattr(model, "lm", model), optimizer_steps, output_dir)
    if cfg.gradient_checkpointing or (engine == "fsdp2"
                                      and dist.fsdp_settings(cfg)["activation_checkpointing"]):
        enable_gradient_checkpointing(model, cfg.checkpoint_every_n_layers)
    if cfg.neftune_noise_alpha is not None:
        add_neftune_noise(getattr(model, "lm", model), cfg.neftune_noise_alpha)
    # The engines that gather a layer's weights for its forward only would leave the norms' recipes
    # pointing at released weights.
    recompute = engine in ("single", "ddp")
    if recompute:
        tag_norm_outputs(model)
    root = LossModule(model, recompute)
    if engine == "fsdp2":
        # Sharding replaces the parameters with DTensors: the optimizer is built on those.
        root.to(accelerator.device)
        dist.shard(root, model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                              num_warmup_steps=cfg.warmup_for(optimizer_steps),
                              num_training_steps=optimizer_steps,
                              scheduler_specific_kwargs=cfg.lr_scheduler_kwargs)
    if engine == "deepspeed":
        # DeepSpeed's engine wraps the loss module and steps the optimizer it is handed; the
        # schedule stays lmtune's, stepped once per optimizer step.
        root.to(accelerator.device)
        wrapped = zero.initialize(root, optimizer, cfg, _hidden_size(model))
    elif engine == "fsdp2":
        wrapped = root
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        wrapped, optimizer, scheduler = accelerator.prepare(root, optimizer, scheduler)
    return Trainer(cfg, model, tokenizer, accelerator, optimizer, scheduler, hooks, output_dir,
                   trainable, wrapped, engine)


def _hidden_size(model: torch.nn.Module) -> int:
    config = getattr(model, "lm", model).config  # a reward or value model: its LM's
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


def checkpoint_or_stop(trainer: Trainer, step: int, plan: Schedule, stop_requested: list[int],
                       state: dict[str, Any], unit: str = "step") -> None:
    """Write checkpoint-`step` on the save_strategy cadence or when a stop was requested (then
    stop, saying how to resume). The last step saves nothing here: `finish` writes the run's output."""
    output_dir, total = trainer.output_dir, plan.total
    # A signal may reach the ranks at different steps; all stop at the first step any rank saw it.
    interrupted = bool(dist.sum_over_ranks(len(stop_requested))) and step < total
    if interrupted or is_save_step(trainer.cfg, step, plan):
        trainer.save_checkpoint(step, state)
    if interrupted:
        raise RunInterrupted(f"stopped at {unit} {step} of {total}; checkpoint-{step} saved in "
                             f"{output_dir}.",
                             "run the same command with resume_from_checkpoint=auto to continue.")


def finish(trainer: Trainer, results: dict[str, Any], log: TrainerLog,
           plots: tuple[tuple[str, str], ...] = (("loss", PLOT_FILE),)) -> dict[str, Any]:
    """The run's output: the model, all_results.json (with parameter counts and the memory
    allocator the process ran on) and the plots."""
    cfg, output_dir = trainer.cfg, trainer.output_dir
    trainer.save_weights(output_dir, final=True)
    trainable_count, total_count = count_parameters(trainer.unwrapped)
    results = results | {"trainable_params": trainable_count, "total_params": total_count,
                         "allocator": active_allocator()}

    def write() -> None:
        if cfg.plot_loss:
            for key, name in plots:
                if plot_loss(log.records, output_dir / name, f"{cfg.stage} / {cfg.finetuning_type}",
                             key=key, beside=GENERATION_METRICS if key == "loss" else ()):
                    print(f"{key} plot: {output_dir / name}")
        write_results(output_dir, results, cfg.to_yaml_dict())  # last: it marks the run complete

    dist.on_main(write)
    log.close()
    return results


def generation_metrics(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, eval_rows: list[Any]
                       ) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """eval_generate_samples: a scorer that answers the first N val rows greedily and compares the
    answers with their replies (eval_bleu-4, eval_rouge-*, eval_exact_match); None when off."""
    if not cfg.eval_generate_samples or not eval_rows:
        return None
    from lmtune.evaluate.predict import Generation, score_rows
    from lmtune.models.load import stop_token_ids

    rows = eval_rows[: cfg.eval_generate_samples]
    settings = Generation.from_config(cfg.model_copy(update={"do_sample": False}))

    def score(model: torch.nn.Module) -> dict[str, float]:
        return score_rows(model, tokenizer, rows, stop_token_ids(tokenizer, model), settings,
                          cfg.per_device_eval_batch_size)

    return score


def start_metrics(log: TrainerLog) -> dict[str, Any]:
    """The step-0 evaluation as <name>_start: the baseline the final numbers are read against."""
    start = next((r for r in log.records if r["step"] == 0), {})
    return {f"{k}_start": v for k, v in start.items() if k.startswith("eval_")}


def fit(cfg: RunConfig, model, tokenizer: PreTrainedTokenizerBase, train_rows: list[Any] | RowStream,
        eval_rows: list[Any], objective: Objective, output_dir: Path, resume_dir: Path | None,
        extra_results: dict[str, Any], eval_groups: list[tuple[str, int]] = ()) -> dict[str, Any]:
    """Train `model` on `train_rows`; write logs, checkpoints and the result into `output_dir`
    (already prepared by `checkpoint.prepare_run`), continuing from `resume_dir` if given.
    `eval_groups` (name, rows) cut `eval_rows` into datasets scored also on their own, as
    eval_<name>_loss and so on (eval_on_each_dataset)."""
    if not cfg.do_train:
        print("do_train is false: data, model and method checked; nothing trained.")
        return {}
    plan = schedule(cfg, None if isinstance(train_rows, RowStream) else len(train_rows))
    trainer = prepare_trainer(cfg, model, tokenizer, output_dir, plan.optimizer_steps)
    pad_id = tokenizer.pad_token_id
    state = trainer.resume(resume_dir, {"global_step": 0, "tokens_seen": 0, "units_seen": 0,
                                        "loss_sum": 0.0})
    log = TrainerLog(output_dir, state["global_step"],
                     open_trackers(cfg, output_dir) if dist.is_main() else [], files=dist.is_main())
    best = BestEvaluation(cfg, trainer.trainable, output_dir, state)
    windows = _row_windows(train_rows, cfg)
    for _ in range(state["global_step"]):  # replay the data order up to the resumed step
        next(windows)

    def epoch_at(step: int) -> float:
        # A stream's epoch is the passes over its data completed so far (its length is unknown).
        return round(step / plan.per_epoch, 4) if plan.per_epoch else float(train_rows.epoch)

    generated = generation_metrics(cfg, tokenizer, eval_rows)

    def run_eval() -> dict[str, float]:
        metrics = evaluate(trainer, eval_rows, objective, pad_id)
        start = 0
        for name, n in eval_groups:
            part = evaluate(trainer, eval_rows[start: start + n], objective, pad_id)
            metrics |= {f"eval_{name}_{k.removeprefix('eval_')}": v for k, v in part.items()}
            start += n
        if not generated:
            return metrics
        with trainer.autocast():  # the precision the model trains in (and its storage expects)
            return metrics | generated(trainer.unwrapped)

    # The val split's metrics before the first update: the baseline every later eval is read
    # against (logged as step 0; all_results.json gets them as <name>_start).
    if eval_rows and cfg.eval_strategy != "no" and state["global_step"] == 0:
        log.write({"step": 0, "epoch": 0.0} | run_eval())

    # --- the loop ---------------------------------------------------------------------------------
    trainer.model.train()
    progress = tqdm(total=plan.total, initial=state["global_step"], desc="train", unit="step",
                    mininterval=1.0, disable=not dist.is_main())
    # Sums since the last log line; checkpointed so a resumed run logs exactly the same numbers.
    interval = state.pop("log_interval", {"loss": 0.0, "units": 0, "tokens": 0})
    interval_metrics = MetricTotals(state.pop("log_metrics", None))
    interval_start = time.perf_counter()
    run_start, tokens_before = time.perf_counter(), state["tokens_seen"]
    last_eval: dict[str, float] = {}
    stop_early = False
    with stop_requests() as stop_requested:
        for step in range(state["global_step"] + 1, plan.total + 1):
            # This rank's share of the step's window; a micro-batch of weight 0 only joins the
            # gradient reduction.
            window = next(windows)
            if cfg.group_by_length and objective.length is not None:
                window = group_by_length(window, objective.length)
            share = [(trainer.to_device(objective.collate(rows, pad_id)), weight)
                     for rows, weight in dist.rank_share(window)]
            window_units = dist.all_sum(sum(weight * objective.units(b) for b, weight in share))
            # Gradients are averaged over ranks by the engine: scaling by the world size makes
            # the update the sum over the window divided by its units, as in one process.
            scale = dist.world_size() / window_units
            step_loss, step_tokens, step_metrics = 0.0, 0, MetricTotals()
            for i, (batch, weight) in enumerate(share):
                with trainer.gradient_sync(i == len(share) - 1):
                    with trainer.autocast():
                        loss, metrics = trainer.forward(objective.loss, batch)
                    step_loss += weight * trainer.backward(loss, f"step {step}",
                                                           scale=weight * scale)
                step_metrics.add(metrics if weight else {})
                step_tokens += int(weight * batch["attention_mask"].sum())
            lr, grad_norm = trainer.optimizer_step(step, f"step {step}")
            step_loss, step_tokens, step_sums = dist.sum_over_ranks(
                (step_loss, step_tokens, step_metrics.sums))
            interval_metrics.add_sums(step_sums)

            for totals, loss_key, units_key, tokens_key in (
                    (interval, "loss", "units", "tokens"),
                    (state, "loss_sum", "units_seen", "tokens_seen")):
                totals[loss_key] += step_loss
                totals[units_key] += window_units
                totals[tokens_key] += step_tokens
            state["global_step"] = step
            progress.update(1)

            record: dict[str, Any] = {}
            if is_log_step(cfg, step, plan.total):
                elapsed = time.perf_counter() - interval_start
                record |= {"loss": round(interval["loss"] / interval["units"], 6), "lr": lr,
                           "grad_norm": round(grad_norm, 6),
                           "tokens_per_second": round(interval["tokens"] / elapsed, 2)}
                record |= interval_metrics.means()
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                interval = {"loss": 0.0, "units": 0, "tokens": 0}
                interval_metrics = MetricTotals()
                interval_start = time.perf_counter()
            if eval_rows and is_eval_step(cfg, step, plan):
                last_eval = {"step": step} | run_eval()
                record |= {k: v for k, v in last_eval.items() if k != "step"}
                stop_early = best.active and best.update(step, last_eval)
            if record:
                log.write({"step": step, "epoch": epoch_at(step)} | record)
            try:
                checkpoint_or_stop(trainer, step, plan, stop_requested,
                                   state | {"log_interval": interval,
                                            "log_metrics": interval_metrics.sums})
            except RunInterrupted:
                progress.close()
                raise
            if stop_early:
                print(f"early_stopping_steps: {best.metric} did not improve on step "
                      f"{state['best_step']} in {cfg.early_stopping_steps} evaluations; stopping "
                      f"at step {step} of {plan.total}.")
                break
    progress.close()
    restored = best.restore()
    if restored is not None and restored != state["global_step"]:
        print(f"load_best_model_at_end: the weights of step {restored} ({best.metric} "
              f"{state['best_metric']}) are the run's output.")
        last_eval = {}  # the final evaluation is of the restored weights
    runtime = time.perf_counter() - run_start

    # --- the result -------------------------------------------------------------------------------
    results = {
        "train_loss": state["loss_sum"] / max(state["units_seen"], 1),
        "train_runtime": round(runtime, 2),
        "train_tokens": state["tokens_seen"],
        "train_tokens_per_second": round((state["tokens_seen"] - tokens_before) / max(runtime, 1e-9),
                                         2),
        "global_step": state["global_step"], "epoch": epoch_at(state["global_step"]),
    }
    if eval_rows:
        # The last step's evaluation is the final one when it ran there: the model is the same.
        final = {k: v for k, v in last_eval.items() if k != "step"} \
            if last_eval.get("step") == state["global_step"] else run_eval()
        results |= final | start_metrics(log)
    if best.active:
        results |= {"best_step": state["best_step"], f"best_{best.metric}": state["best_metric"]}
    output = finish(trainer, results | extra_results, log)
    best.clean_up()
    return output
