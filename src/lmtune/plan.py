"""`lmtune plan`: honest accounting before a single step is trained.

The data side runs the real data pipeline (the rows counted are the rows `lmtune train` would
train on). The model side builds the model on the meta device, so no weight is read: parameters, the
method's trainable share (the methods code applied to that model), and a memory estimate. With
`--measure`, a few real optimizer steps of the real stage give tokens/s and the wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import resource
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from lmtune import distributed
from lmtune.config import RunConfig
from lmtune.data.encode import IGNORE_INDEX, EncodedRow, KTORow, PreferenceRow, Row
from lmtune.data.pipeline import PreparedData, prepare_data, training_rows
from lmtune.data.report import DataReport
from lmtune.data.streaming import RowStream
from lmtune.durable import write_with
from lmtune.errors import ConfigError, ModelError
from lmtune.models.load import add_new_tokens, from_pretrained_or_error, load_tokenizer, resolve_for, stop_token_ids
from lmtune.models.methods import apply_method, count_parameters
from lmtune.models.precision import checkpoint_half_dtype, half_dtype, half_frozen_base, stored_half
from lmtune.train.engine import schedule
from lmtune.models.gated_mlp import is_silu_gated_mlp
from lmtune.train.head_loss import SLICE_ROWS, chunk_rows
from lmtune.train.optim import state_bytes

GIB = 2**30
# What a training process holds before any weight or batch: Python, torch, transformers, peft and
# the default model's tokenizer (peak RSS of the `runtime` row of benchmarks/memory_levers.py,
# which imports what `lmtune train` imports and loads that tokenizer; measured 2026-12-03, when
# bitsandbytes was imported by every run: now only quantized runs and 8-bit optimizers load it,
# and the others start about 45 MiB lower).
RUNTIME_GIB = 0.45


def meta_model(model_path: str, cfg: RunConfig) -> torch.nn.Module:
    """The model's modules and parameter shapes without its weights (nothing is read or allocated),
    in the dtype the run stores them in, carrying its generation config for the stop tokens."""
    config = from_pretrained_or_error(AutoConfig, model_path, "config",
                                      trust_remote_code=cfg.trust_remote_code)
    stored = None if cfg.train_from_scratch else checkpoint_half_dtype(model_path)
    dtype = half_dtype(config, stored) if half_frozen_base(cfg, stored) else torch.float32
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{model_path}/config.json does not describe a causal language model "
                         f"transformers can build: {str(exc).splitlines()[0]}",
                         "point model_name_or_path to a decoder-only model folder.") from None
    with contextlib.suppress(OSError):  # a folder without generation_config.json
        model.generation_config = GenerationConfig.from_pretrained(model_path)
    return model


def schedule_summary(cfg: RunConfig, n_rows: int | None, report_packing: Any,
                     world_size: int = 1) -> dict[str, Any]:
    """Steps as the training loop counts them: the loop's own `schedule` (fit's optimizer steps,
    or ppo's iterations) for `world_size` processes. n_rows None: streaming, rows not known."""
    plan = schedule(cfg, n_rows, world_size)
    if n_rows is None:
        return {"streaming": True, "train_rows": None, "effective_batch": plan.rows_per_step,
                "per_device_batch": cfg.per_device_train_batch_size,
                "accumulation": cfg.gradient_accumulation_steps, "world_size": world_size,
                "steps_per_epoch": None, "optimizer_steps": plan.optimizer_steps, "epochs": None,
                "warmup_steps": cfg.warmup_for(plan.optimizer_steps)}
    out = {"train_rows": n_rows, "effective_batch": plan.rows_per_step,
           "per_device_batch": cfg.per_device_train_batch_size,
           "accumulation": cfg.gradient_accumulation_steps, "world_size": world_size,
           "steps_per_epoch": plan.per_epoch, "optimizer_steps": plan.optimizer_steps,
           "epochs": plan.epochs, "warmup_steps": cfg.warmup_for(plan.optimizer_steps)}
    if cfg.stage == "ppo":
        return out | {"iterations": plan.total, "ppo_epochs": cfg.ppo_epochs}
    if report_packing is not None:
        out["samples_per_step"] = round(plan.rows_per_step * report_packing.samples_per_row, 1)
    return out


_LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def layers_in_backward(model: torch.nn.Module, n_layers: int) -> int:
    """Decoder layers whose activations autograd keeps: from the lowest one holding a trainable
    weight up, since nothing below it needs a gradient (freeze's last layers keep only theirs);
    all of them when the input side trains (embeddings, virtual tokens)."""
    lowest = n_layers
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        found = _LAYER_INDEX.search(name)
        if found:
            lowest = min(lowest, int(found.group(1)))
        elif "embed" in name or "prompt_encoder" in name:
            return n_layers
    return n_layers - lowest


def kept_per_token_and_layer(model: torch.nn.Module, cfg: RunConfig) -> float:
    """Bytes autograd keeps for backward per token in a decoder layer that trains, for a
    Llama-style block (tests/test_plan.py counts them on a real forward): each norm's input in the
    residual stream's dtype and its reciprocal root mean square (fp32); in the compute dtype the
    attention's query, keys and values and its output (o_proj's input), the MLP's gate and up
    outputs (a silu MLP; other MLPs their activation's output and the product too) and each LoRA
    A's output; a norm whose weight trains keeps its normalised input (fp32); the log-sum-exp of
    each head (fp32). The norms' outputs and the silu MLP's product are made again in backward
    (models/recompute.py) but under FSDP2 and DeepSpeed, which keep them."""
    c = model.config
    width = 2 if cfg.bf16 or cfg.fp16 or cfg.pure_bf16 else 4
    residual = 2 if cfg.pure_bf16 else 4
    h, i = c.hidden_size, getattr(c, "intermediate_size", 4 * c.hidden_size)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", heads) * getattr(c, "head_dim", h // heads)
    silu_gated = any(is_silu_gated_mlp(m) for m in model.modules())
    kept = 2 * (h * residual + 4) + width * (2 * h + 2 * kv + (2 if silu_gated else 4) * i) + 4 * heads
    if distributed.fsdp_settings(cfg) or distributed.deepspeed_settings(cfg):
        kept += width * (2 * h + (i if silu_gated else 0))
    layers = max(c.num_hidden_layers, 1)
    if any(p.requires_grad for n, p in model.named_parameters()
           if "norm" in n and _LAYER_INDEX.search(n)):
        kept += 2 * h * 4
    adapter_rank = sum(m.weight.shape[0] for n, m in model.named_modules()
                       if n.split(".")[-2:-1] == ["lora_A"] and hasattr(m, "weight"))
    return kept + width * adapter_rank / layers


def memory_estimate(model: torch.nn.Module, cfg: RunConfig, micro_batch_tokens: int,
                    micro_batch_targets: int, row_length: int = 0) -> dict[str, float]:
    """Peak training memory in GiB: the runtime (Python, torch, tokenizer), weights, gradients and
    AdamW states of what trains, the compute-dtype copies autocast makes of fp32 matmul weights,
    activations.

    Weights count as stored: an adapter method's frozen base in half precision where the run
    stores it so (models/precision.py; `model` is built in the dtype a run stores it in), a
    quantized base's linear layers at the bits bitsandbytes stores, else fp32. Under autocast every fp32 weight a linear layer uses is cast
    to the compute dtype in each forward and kept for backward; a half-precision base is used as
    it is. Activations: what each decoder layer keeps per token (`kept_per_token_and_layer`), the
    attention mask of rows of `row_length` tokens (kept once, models/shared_mask.py), and the
    output head on the trained positions only (lmtune computes logits there alone, a chunk of them
    at a time with chunked_cross_entropy)."""
    c = model.config
    half = half_frozen_base(cfg, stored_half(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    output = model.get_output_embeddings()
    matmul_weights = {id(m.weight): m.weight for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and isinstance(m.weight, torch.nn.Parameter)}
    # bitsandbytes quantizes every frozen linear layer but the output head: 4 bits and a scale per
    # block of 64 (fp32, or 8 bits with double_quantization), or 8 bits
    quantized = {id(w) for w in matmul_weights.values() if not w.requires_grad} - \
        {id(output.weight) if output is not None else None} if cfg.quantization_bit else set()
    quantized_bytes = (0.5 + (1 if cfg.double_quantization else 4) / 64
                       if cfg.quantization_bit == 4 else 1.0)

    def stored(p: torch.nn.Parameter) -> float:
        if id(p) in quantized:
            return quantized_bytes
        if cfg.pure_bf16:
            return 2
        return 2 if half and not p.requires_grad and p.ndim >= 2 else 4

    weights = sum(p.numel() * stored(p) for p in model.parameters())
    gradient_sizes = [p.numel() * (2 if cfg.pure_bf16 else 4) for p in trainable]
    # Layer-wise GaLore / APOLLO free each weight's gradient at its update, inside the backward.
    gradients = (max(gradient_sizes, default=0) if cfg.galore_layerwise or cfg.apollo_layerwise
                 else sum(gradient_sizes))
    optimizer = state_bytes(model, cfg)
    width = 2 if cfg.bf16 or cfg.fp16 or cfg.pure_bf16 else 4
    casts = sum(w.numel() * width for w in matmul_weights.values() if stored(w) == 4) \
        if width == 2 else 0
    h = c.hidden_size
    per_token_layer = kept_per_token_and_layer(model, cfg)
    kept = layers_in_backward(model, c.num_hidden_layers)
    if cfg.gradient_checkpointing:
        # A checkpointed layer keeps its input and is recomputed, one at a time, in backward; every
        # n-th layer is checkpointed (the 1st, the (n+1)-th, ...), the others keep their activations.
        recomputed = math.ceil(kept / cfg.checkpoint_every_n_layers)
        layers = (recomputed * 4 * h + (kept - recomputed) * per_token_layer
                  + per_token_layer * (kept > 0)) * micro_batch_tokens
    else:
        layers = kept * per_token_layer * micro_batch_tokens
    mask = micro_batch_tokens * row_length * width if kept else 0
    # logits, their fp32 copy and its gradient: of every target position at once, or with
    # chunked_cross_entropy of one chunk's (of a vocabulary slice's, for a head that does not
    # train), plus the hidden states' gradient made in the same pass, and a head that trains keeps
    # its weight's gradient from that pass (ppo's head keeps the whole logits: its entropy needs
    # them)
    rows, columns = micro_batch_targets, c.vocab_size
    head_trains = output is not None and output.weight.requires_grad
    if cfg.chunked_cross_entropy and cfg.stage != "ppo":
        if output is not None and not head_trains:
            columns = min(columns, SLICE_ROWS)
        rows = min(rows, chunk_rows(columns, "cuda" if torch.cuda.is_available() else "cpu"))
    head = rows * columns * (width + 8)
    if rows < micro_batch_targets:
        head += micro_batch_targets * h * 4
        if head_trains:
            head += output.weight.numel() * 4
    activations = layers + mask + head
    parts = {"runtime": RUNTIME_GIB * GIB, "weights": weights, "gradients": gradients,
             "optimizer": optimizer, "autocast_copies": casts, "activations": activations}
    return {k: round(v / GIB, 3) for k, v in parts.items()} | {
        "total": round(sum(parts.values()) / GIB, 3)}


def memory_per_rank(model: torch.nn.Module, memory: dict[str, float],
                    world_size: int) -> dict[str, float]:
    """Peak GiB on each of `world_size` ranks under each engine, from the one-process estimate:
    DDP replicates everything; ZeRO-2 (FSDP2 shard_grad_op) shards gradients and optimizer states;
    ZeRO-3 (FSDP2 full_shard) shards the weights too, plus the largest unit gathered whole at a
    time (two decoder layers with prefetch, or the embedding); offload moves the optimizer (ZeRO-2)
    or optimizer and weights (ZeRO-3) to CPU memory. Activations, autocast's copies and the
    runtime are per rank in every engine."""
    w, g, o = (memory[k] for k in ("weights", "gradients", "optimizer"))
    a = memory["activations"] + memory["runtime"] + memory["autocast_copies"]  # on every rank
    n = world_size
    layers = getattr(model.config, "num_hidden_layers", 1)
    embedding = model.get_input_embeddings()
    embed = embedding.weight.numel() * embedding.weight.element_size() / GIB
    gathered = max(2 * (w - embed) / max(layers, 1), embed)
    out = {"ddp": w + g + o + a,
           "fsdp2_shard_grad_op_or_zero2": w + (g + o) / n + a,
           "zero2_offload": w + g / n + a,
           "fsdp2_full_shard_or_zero3": (w + g + o) / n + (gathered if n > 1 else 0.0) + a,
           "zero3_offload": gathered + a}
    return {k: round(v, 3) for k, v in out.items()}


def model_side(model: torch.nn.Module, cfg: RunConfig, train_rows: list[Row] | RowStream,
               world_size: int = 1) -> dict[str, Any]:
    """Total and trainable parameters for cfg's method, and the memory estimate."""
    out: dict[str, Any] = {"architecture": type(model).__name__}
    # PiSSA initialises its factors from an SVD of real weights, which a meta model has not; it
    # trains exactly the matrices of a plain LoRA adapter of the same rank, so count those. A
    # quantized base would be loaded for real to be quantized: its adapter has the same shapes on
    # the meta model's linear layers, and memory_estimate counts their weights at the bits stored.
    model = apply_method(model, cfg.model_copy(update={"pissa_init": False, "quantization_bit": None,
                                                       "frozen_dtype": "float32"}))
    trainable, total = count_parameters(model)
    # The largest micro-batch: packed rows fill cutoff_len; else the longest rows pad together.
    # A preference pair is two rows (chosen, rejected), a KTO answer two (with its mismatched pair);
    # a ppo row is a prompt and up to max_new_tokens of reply.
    # Streaming: the rows are not known, so every row counts at cutoff_len (the most it can be).
    lengths = ([(cfg.cutoff_len, cfg.cutoff_len)] * cfg.per_device_train_batch_size if cfg.streaming
               else [(r.length, r.n_targets) for r in train_rows])
    longest = sorted((n for n, _ in lengths), reverse=True)[: cfg.per_device_train_batch_size]
    targets = sorted((t for _, t in lengths), reverse=True)[: cfg.per_device_train_batch_size]
    if cfg.stage == "ppo":
        longest = [n + cfg.max_new_tokens for n in longest]
        targets = [cfg.max_new_tokens] * len(longest)
    rows_per_item = 2 if cfg.stage in ("rm", "dpo", "kto") else 1
    tokens = rows_per_item * len(longest) * (longest[0] if longest else 0)
    if cfg.stage == "rm":
        targets = []  # a scalar head instead of the output head
    out |= {"total_params": total, "trainable_params": trainable,
            "trainable_percent": round(100 * trainable / total, 4),
            "memory_gib": memory_estimate(model, cfg, tokens, sum(targets),
                                          longest[0] if longest else 0),
            "micro_batch_tokens": tokens}
    out["memory_per_rank_gib"] = memory_per_rank(model, out["memory_gib"], world_size)
    return out


def measure(cfg: RunConfig, steps: int) -> dict[str, Any]:
    """A few real optimizer steps (ppo: iterations) of the stage, in a scratch output_dir: the speed
    and peak memory."""
    from lmtune.train import STAGES
    from lmtune.train.logs import read_log

    with tempfile.TemporaryDirectory() as scratch:
        run_cfg = cfg.model_copy(update={
            "output_dir": scratch, "overwrite_output_dir": True, "resume_from_checkpoint": None,
            "max_steps": steps + 1, "logging_steps": 1, "save_strategy": "no", "plot_loss": False,
            "eval_strategy": "no", "do_train": True})
        with contextlib.redirect_stdout(io.StringIO()):
            STAGES[cfg.stage](run_cfg)
        log = read_log(Path(scratch) / "trainer_log.jsonl")
    steps_run = [r for r in log if r["step"] > 1]  # the first step warms up; step 0 is eval
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {"steps": len(steps_run), "peak_memory_gib": round(peak / GIB, 3),
           "peak_memory_kind": "cuda allocated" if torch.cuda.is_available() else "process RSS"}
    if cfg.stage == "ppo":  # an iteration's time is mostly generation, not tokens trained
        return out | {"seconds_per_iteration": round(
            statistics.median(r["seconds"] for r in steps_run), 2)}
    return out | {"tokens_per_second": round(
        statistics.median(r["tokens_per_second"] for r in steps_run), 1)}


def _trained_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> str:
    """Decoded ids with trained spans shown «like this»."""
    out, run, trained = [], [], None
    for token, label in zip(ids, labels):
        now = label != IGNORE_INDEX
        if run and now != trained:
            text = tokenizer.decode(run)
            out.append(f"«{text}»" if trained else text)
            run = []
        run.append(token)
        trained = now
    if run:
        text = tokenizer.decode(run)
        out.append(f"«{text}»" if trained else text)
    return "".join(out)


def show_row(tokenizer: PreTrainedTokenizerBase, row: Row) -> str:
    if isinstance(row, EncodedRow):
        return _trained_text(tokenizer, row.input_ids, row.labels)
    if isinstance(row, PreferenceRow):
        return (f"prompt: {tokenizer.decode(row.prompt_ids)}\n"
                f"chosen: {_trained_text(tokenizer, row.chosen_ids, row.chosen_labels)}\n"
                f"rejected: {_trained_text(tokenizer, row.rejected_ids, row.rejected_labels)}")
    assert isinstance(row, KTORow)
    return (f"prompt: {tokenizer.decode(row.prompt_ids)}\n"
            f"{'desirable' if row.desirable else 'undesirable'}: "
            f"{_trained_text(tokenizer, row.completion_ids, row.completion_labels)}")


def dump_encoded(data: PreparedData, path: Path) -> int:
    """Every encoded row (before packing) as one JSON line with its split; returns the count."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        # Streaming: one pass of the train rows in file order, written as they are encoded.
        train = data.train.encoded() if isinstance(data.train, RowStream) else data.train
        with open(tmp, "w", encoding="utf-8") as out:
            for split, rows in (("train", train), ("val", data.val)):
                for row in rows:
                    fields = {k: v for k, v in dataclasses.asdict(row).items() if v is not None}
                    out.write(json.dumps({"split": split} | fields) + "\n")
                    count += 1

    write_with(Path(path), write, "the encoded rows (--dump-encoded)")
    return count


def build_plan(cfg: RunConfig, measure_steps: int = 0, world_size: int | None = None
               ) -> tuple[dict[str, Any], PreparedData, PreTrainedTokenizerBase]:
    """The plan as a JSON-able dict, plus the prepared data and tokenizer (for --examples / dumps),
    for `world_size` processes (default: WORLD_SIZE, else 1)."""
    if measure_steps < 0:
        raise ConfigError(f"--measure-steps {measure_steps}: a number of steps is 1 or more.",
                          "use e.g. --measure-steps 3.")
    world = world_size or distributed.world_size()
    if not cfg.dataset_names:
        raise ConfigError("lmtune plan needs a dataset, and none is set.",
                          "add e.g. dataset: identity (a name in dataset_info.json) or a file path.")
    model_path = resolve_for(cfg)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    add_new_tokens(tokenizer, cfg)  # the rows are counted as training encodes them
    model = meta_model(model_path, cfg)
    data = prepare_data(cfg, tokenizer, stop_token_ids(tokenizer, model))
    train_rows, _ = training_rows(data, cfg, model.config)
    n_rows = None if isinstance(train_rows, RowStream) else len(train_rows)
    plan: dict[str, Any] = {"stage": cfg.stage, "data": data.report.to_dict(),
                            "schedule": schedule_summary(cfg, n_rows, data.report.packing, world),
                            "model": model_side(model, cfg, train_rows, world)}
    warnings = data.report.warnings()
    steps = plan["schedule"]
    if steps["steps_per_epoch"] == 1 and cfg.max_steps <= 0:
        warnings.append(f"one optimizer step per epoch: the effective batch ({steps['effective_batch']}) "
                        f"covers all {len(train_rows):,} training rows")
    if cfg.max_steps > 0 and n_rows is not None and steps["optimizer_steps"] < steps["steps_per_epoch"]:
        warnings.append(f"max_steps={cfg.max_steps} ends the run before one epoch "
                        f"({steps['steps_per_epoch']} steps) is done")
    if measure_steps:
        measured = measure(cfg, measure_steps)
        if cfg.stage == "ppo":
            seconds = measured["seconds_per_iteration"] * steps["iterations"]
        elif n_rows is None:  # streaming: tokens per step unknown; bounded by full cutoff_len rows
            seconds = (steps["optimizer_steps"] * steps["effective_batch"] * cfg.cutoff_len
                       / measured["tokens_per_second"])
        else:
            train_tokens = sum(r.n_tokens for r in train_rows) * steps["optimizer_steps"] / max(
                1, steps["steps_per_epoch"])
            seconds = train_tokens / measured["tokens_per_second"]
        plan["measured"] = measured | {"estimated_train_seconds": round(seconds, 6)}
    plan["warnings"] = warnings
    return plan, data, tokenizer


def plan_lines(plan: dict[str, Any], report: DataReport) -> list[str]:
    """The plan in plain words, for the terminal."""
    lines = [f"== data (stage {plan['stage']}) =="] + report.lines()
    s = plan["schedule"]
    lines.append("== schedule ==")
    if s.get("streaming"):
        lines.append(f"effective batch {s['effective_batch']} = {s['per_device_batch']} per device x "
                     f"{s['accumulation']} accumulation x {s['world_size']} processes")
        rows = s["optimizer_steps"] * s["effective_batch"]
        lines.append(f"streaming: training rows are not known up front; max_steps "
                     f"{s['optimizer_steps']:,} optimizer steps read {rows:,} rows (the data is read "
                     f"again from its start when it runs out), {s['warmup_steps']:,} warmup")
    elif "iterations" in s:
        lines.append(f"{s['train_rows']:,} prompts, {s['effective_batch']} per iteration -> "
                     f"{s['steps_per_epoch']:,} iterations per epoch; {s['iterations']:,} iterations "
                     f"({s['epochs']} epochs), {s['optimizer_steps']:,} optimizer steps "
                     f"(ppo_epochs {s['ppo_epochs']}), {s['warmup_steps']:,} warmup")
    else:
        lines.append(f"effective batch {s['effective_batch']} = {s['per_device_batch']} per device x "
                     f"{s['accumulation']} accumulation x {s['world_size']} processes")
        lines.append(f"{s['train_rows']:,} training rows, effective batch {s['effective_batch']} -> "
                     f"{s['steps_per_epoch']:,} steps per epoch; {s['optimizer_steps']:,} optimizer "
                     f"steps ({s['epochs']} epochs), {s['warmup_steps']:,} warmup")
    if "samples_per_step" in s:
        lines.append(f"packing puts about {s['samples_per_step']} samples in each optimizer step")
    m = plan["model"]
    lines.append(f"== model ({m['architecture']}, no weights loaded) ==")
    lines.append(f"{m['total_params']:,} parameters, {m['trainable_params']:,} trainable "
                 f"({m['trainable_percent']:.2f}%)")
    g = m["memory_gib"]
    lines.append(f"estimated peak memory {g['total']:.2f} GiB: runtime {g['runtime']:.2f}, weights "
                 f"{g['weights']:.2f}, gradients {g['gradients']:.2f}, optimizer {g['optimizer']:.2f}, "
                 f"autocast copies {g['autocast_copies']:.2f}, activations {g['activations']:.2f} "
                 f"(largest micro-batch {m['micro_batch_tokens']:,} tokens)")
    r = m["memory_per_rank_gib"]
    lines.append(f"per rank with {s['world_size']} processes: DDP {r['ddp']:.2f} GiB, FSDP2 "
                 f"shard_grad_op / ZeRO-2 {r['fsdp2_shard_grad_op_or_zero2']:.2f}, ZeRO-2 + offload "
                 f"{r['zero2_offload']:.2f}, FSDP2 full_shard / ZeRO-3 "
                 f"{r['fsdp2_full_shard_or_zero3']:.2f}, ZeRO-3 + offload {r['zero3_offload']:.2f}")
    if "measured" in plan:
        r = plan["measured"]
        lines.append(f"== measured ({r['steps']} steps) ==")
        speed = (f"{r['seconds_per_iteration']} s per iteration" if "seconds_per_iteration" in r
                 else f"{r['tokens_per_second']:,} tokens/s")
        bound = "at most" if s.get("streaming") else "about"  # streaming: rows of cutoff_len
        lines.append(f"{speed} -> {bound} {_duration(r['estimated_train_seconds'])} of training; "
                     f"peak {r['peak_memory_kind']} {r['peak_memory_gib']:.2f} GiB")
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
