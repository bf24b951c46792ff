"""What changes when lmtune runs as one of several processes: under `torchrun`, `accelerate launch`,
or `lmtune train --nproc N` (which starts torchrun itself).

Every function here is also right for one process (rank 0 of a world of 1), so the training loop
calls them unconditionally and reads the same either way:
- ranks: `world_size`, `rank`, `is_main`; `init` joins the process group (gloo on CPU, nccl on
  CUDA, through accelerate) with `ddp_timeout`, and silences stdout on all but rank 0;
- sharding: `rank_share` gives each rank its strided, non-overlapping part of a step's window of
  micro-batches (the window, not the rank, decides the data order, so it is reproducible and the
  same for any number of ranks);
- global counts: `all_sum` / `sum_over_ranks` add numbers over ranks (the loss normaliser is the
  target-token count of the WHOLE window on all ranks);
- writes: `on_main` runs a function on rank 0 only and hands its result, or its LmtuneError, to
  every rank, so a refusal on rank 0 ends all ranks at once with the same message;
- the launcher: `launch` runs torchrun and reports the first failing rank's own error;
- the engines: `engine` picks DDP, FSDP2 (`shard`) or DeepSpeed ZeRO (lmtune.train.zero) from the
  YAML's fsdp / deepspeed keys and refuses what an engine cannot run, naming why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lmtune.config import RunConfig
from lmtune.errors import ConfigError, LmtuneError

T = TypeVar("T")
# The launcher's folder where each rank that stops with an LmtuneError leaves its message.
ERROR_DIR_ENV = "LMTUNE_ERROR_DIR"


class RankFailed(LmtuneError):
    """A rank of a multi-process job stopped; carries that rank's own message and exit code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(cfg: RunConfig) -> None:
    """Join the job's process group when launched as several processes (no-op for one), after
    refusing what cannot run there. Ranks other than 0 print nothing to stdout: the data report,
    progress and results are rank 0's to show (errors still reach stderr)."""
    engine(cfg)  # a sharded engine this machine cannot run is refused before anything loads
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        if cfg.deepspeed:
            print(f"deepspeed: {cfg.deepspeed} is not applied in one process: ZeRO partitions "
                  "weights, gradients and optimizer states over ranks, and one rank holds them "
                  "all (with no GPU, nothing is offloaded either). Over several processes "
                  "(torchrun, --nproc) DeepSpeed's engine trains the run.")
        return
    if cfg.stage == "ppo":
        raise ConfigError(
            "stage ppo runs in one process: its rollouts (generation, rewards, advantages "
            "normalised over the whole batch) are not split over ranks in this version.",
            "run ppo with plain `lmtune train` (no torchrun / --nproc); the other stages scale out.")
    if cfg.use_badam:
        raise ConfigError(
            "use_badam runs in one process: BAdam switches which block trains by turning "
            "requires_grad on and off, which DDP's and FSDP2's fixed gradient hooks do not follow.",
            "run it with plain `lmtune train`, or scale out with finetuning_type: full (fsdp).")
    if cfg.galore_layerwise or cfg.apollo_layerwise:
        key = "galore_layerwise" if cfg.galore_layerwise else "apollo_layerwise"
        raise ConfigError(
            f"{key} runs in one process: it updates each weight inside the backward pass, before "
            "DDP has averaged that weight's gradient over the ranks.",
            f"run it with plain `lmtune train`, or remove {key} to scale out.")
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=cfg.ddp_timeout))
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def _device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def barrier() -> None:
    if _active():
        dist.barrier()


def all_sum(value: float) -> float:
    """`value` added over all ranks (exact for counts: float64)."""
    if not _active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k))
                for k in a | b}
    if isinstance(a, (list, tuple)):
        return type(a)(_add(x, y) for x, y in zip(a, b))
    return a + b


def sum_over_ranks(values: T) -> T:
    """Numbers, lists and dicts of them added over ranks (keys missing on a rank count as absent)."""
    if not _active():
        return values
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    total = gathered[0]
    for other in gathered[1:]:
        total = _add(total, other)
    return total


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not _active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 only; every rank returns its result or raises its LmtuneError."""
    if not _active():
        return fn(*args, **kwargs)
    outcome: list[Any] = [None]
    if is_main():
        try:
            outcome = [("ok", fn(*args, **kwargs))]
        except LmtuneError as exc:
            outcome = [("error", exc)]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may fill a cache the others then read); the other ranks run
    it once rank 0 is through, or raise rank 0's LmtuneError instead of waiting for ever."""
    if not _active():
        yield
        return
    if not is_main():
        on_main(lambda: None)  # waits for rank 0's outcome below
        yield
        return
    try:
        yield
    except LmtuneError as exc:
        dist.broadcast_object_list([("error", exc)], src=0)
        raise
    dist.broadcast_object_list([("ok", None)], src=0)


def rank_share(window: list[list[T]]) -> list[tuple[list[T], float]]:
    """This rank's micro-batches of a step's window, each with its weight (strided: ranks never
    overlap, and together they cover the window). Every rank runs the same number of micro-batches:
    sharded engines (FSDP2, ZeRO-2/3) reduce gradients in every backward, and each rank must join
    each reduction, so a rank short of one (a short last window) re-runs the window's first
    micro-batch at weight 0."""
    per_rank = -(-len(window) // world_size())
    mine = window[rank()::world_size()]
    return [(rows, 1.0) for rows in mine] + [(window[0], 0.0)] * (per_rank - len(mine))


# --- errors and the launcher ------------------------------------------------------------------

def record_error(exc: LmtuneError) -> bool:
    """Under `lmtune train --nproc`, leave this rank's error for the launcher to report; -> whether
    it was recorded (then the launcher, not this rank, prints it)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    path = Path(folder) / f"rank{rank()}.json"
    path.write_text(json.dumps({"rank": rank(), "message": str(exc),
                                "exit_code": getattr(exc, "exit_code", 2), "time": time.time()}))
    return True


def launch(nproc: int, program: list[str]) -> None:
    """Run `program` (what follows torchrun's own flags, e.g. ["-m", "lmtune.cli", "train", ...]) as
    `nproc` processes on this machine through torchrun. When a rank fails, torchrun stops the others;
    the first rank to fail is reported with its own message. Ctrl-C reaches torchrun, which asks
    every rank to stop (SIGTERM): they finish the step and save one checkpoint."""
    with tempfile.TemporaryDirectory(prefix="lmtune-ranks-") as errors:
        env = os.environ | {ERROR_DIR_ENV: errors}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", *program]
        process = subprocess.Popen(command, env=env)
        # The terminal's Ctrl-C reaches torchrun directly; a SIGTERM sent to this process is
        # passed on, so either way the ranks stop the same way.
        previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                    signal.SIGTERM: signal.signal(
                        signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))}
        try:
            code = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code == 0:
            return
        reports = sorted((json.loads(p.read_text()) for p in Path(errors).glob("rank*.json")),
                         key=lambda r: r["time"])
    if reports:
        first = reports[0]
        raise RankFailed(f"rank {first['rank']} of {nproc}: {first['message']}", first["exit_code"])
    raise RankFailed(f"the job of {nproc} processes failed (torchrun exit code {code}); the failing "
                     "rank's output is above.", code if code > 0 else 1)


# --- sharded engines: FSDP2 and DeepSpeed ZeRO -----------------------------------------------------

# LLaMA-Factory / HF `fsdp` options; lmtune runs FSDP2 (torch's fully_shard), where "full_shard"
# reshards parameters after each forward and "shard_grad_op" keeps them gathered until backward
# (ZeRO-2-like).
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "offload", "auto_wrap")
# fsdp_config keys (with or without the `fsdp_` prefix). Layers are always wrapped by class
# (TRANSFORMER_BASED_WRAP); every rank loads the same weights before they are sharded and FSDP2 always
# keeps the original parameters, so cpu_ram_efficient_loading, sync_module_states and
# use_orig_params (FSDP1-era keys LLaMA-Factory's configs carry) change nothing.
FSDP_CONFIG_KEYS = ("version", "transformer_layer_cls_to_wrap", "reshard_after_forward",
                    "cpu_ram_efficient_loading", "activation_checkpointing", "offload_params",
                    "auto_wrap_policy", "state_dict_type", "sync_module_states", "use_orig_params")
STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
# What `accelerate launch --config_file <an FSDP config>` hands its processes, as fsdp_config keys.
_ACCELERATE_ENV = {"FSDP_VERSION": "version", "FSDP_TRANSFORMER_CLS_TO_WRAP":
                   "transformer_layer_cls_to_wrap", "FSDP_RESHARD_AFTER_FORWARD":
                   "reshard_after_forward", "FSDP_OFFLOAD_PARAMS": "offload_params",
                   "FSDP_ACTIVATION_CHECKPOINTING": "activation_checkpointing",
                   "FSDP_AUTO_WRAP_POLICY": "auto_wrap_policy",
                   "FSDP_STATE_DICT_TYPE": "state_dict_type"}


def _read_structured(path: str, key: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: {path} does not exist.", f"point {key} at a JSON or YAML file.")
    try:
        data = (json.loads(file.read_text()) if file.suffix == ".json"
                else yaml.safe_load(file.read_text()))
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{key}: {path} is not valid {file.suffix.lstrip('.') or 'YAML'} "
                          f"({str(exc).splitlines()[0]}).", "fix the file's syntax.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} must hold a mapping of options.", "see examples/.")
    return data


def _flag(value: Any) -> bool:
    return str(value).lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)


def _accelerate_fsdp_env() -> dict[str, Any] | None:
    """The FSDP settings `accelerate launch` put in the environment, if it launched with FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    settings = {key: os.environ[env] for env, key in _ACCELERATE_ENV.items() if env in os.environ}
    if "transformer_layer_cls_to_wrap" in settings:
        settings["transformer_layer_cls_to_wrap"] = settings["transformer_layer_cls_to_wrap"].split(",")
    return settings


def fsdp_settings(cfg: RunConfig) -> dict[str, Any] | None:
    """`fsdp` + `fsdp_config` (LLaMA-Factory's meaning; keys with or without the `fsdp_` prefix,
    or an accelerate config file's `fsdp_config` section), else the FSDP settings of an
    `accelerate launch` environment -> lmtune's FSDP2 settings, or None without FSDP."""
    from_env = None if cfg.fsdp or cfg.fsdp_config else _accelerate_fsdp_env()
    if not cfg.fsdp and not cfg.fsdp_config and from_env is None:
        return None
    options = cfg.fsdp.split() if isinstance(cfg.fsdp, str) else list(cfg.fsdp or ["full_shard"])
    unknown = [o for o in options if o not in FSDP_OPTIONS]
    if unknown:
        raise ConfigError(f"fsdp: unknown option {', '.join(unknown)}.",
                          f"use some of: {' '.join(FSDP_OPTIONS)}.")
    raw = cfg.fsdp_config or from_env or {}
    raw = _read_structured(raw, "fsdp_config") if isinstance(raw, str) else raw
    raw = raw.get("fsdp_config", raw)  # an `accelerate config` file nests it
    settings = {k.removeprefix("fsdp_"): v for k, v in raw.items()}
    unknown = [k for k in settings if k not in FSDP_CONFIG_KEYS]
    if unknown:
        raise ConfigError(f"fsdp_config: unknown key {', '.join(unknown)}.",
                          f"use some of: {', '.join(FSDP_CONFIG_KEYS)}.")
    if str(settings.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")).upper() != \
            "TRANSFORMER_BASED_WRAP":
        raise ConfigError(f"fsdp_config: auto_wrap_policy {settings['auto_wrap_policy']} is not "
                          "supported; lmtune shards each decoder layer.",
                          "set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP (or leave it out).")
    if int(settings.get("version", 2)) != 2:
        raise ConfigError("fsdp_config: fsdp_version 1 is not supported; lmtune runs FSDP2.",
                          "set fsdp_version: 2 (or leave it out).")
    if "hybrid_shard" in options:
        raise ConfigError("fsdp: hybrid_shard (shard within a node, replicate across nodes) is not "
                          "supported.", "use full_shard or shard_grad_op.")
    state_dict_type = str(settings.get("state_dict_type", "SHARDED_STATE_DICT")).upper()
    if state_dict_type not in STATE_DICT_TYPES:
        raise ConfigError(f"fsdp_config: state_dict_type {settings['state_dict_type']} is not "
                          "supported.", f"use one of: {', '.join(STATE_DICT_TYPES)}.")
    layers = settings.get("transformer_layer_cls_to_wrap")
    return {
        "reshard_after_forward": _flag(settings.get("reshard_after_forward",
                                                    "shard_grad_op" not in options)),
        "cpu_offload": "offload" in options or _flag(settings.get("offload_params", False)),
        "layer_classes": [layers] if isinstance(layers, str) else list(layers or []),
        "activation_checkpointing": _flag(settings.get("activation_checkpointing", False)),
        # Checkpoints: SHARDED_STATE_DICT writes each rank's shards (torch.distributed.checkpoint);
        # FULL_STATE_DICT also gathers the whole weights into the checkpoint, in HF/PEFT format.
        "state_dict_type": state_dict_type,
    }


def deepspeed_path(cfg: RunConfig) -> str | None:
    """The DeepSpeed config file of the run: the YAML's `deepspeed:`, else the one `accelerate
    launch` was given (deepspeed_config_file in its config)."""
    if cfg.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return cfg.deepspeed
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        raise ConfigError("accelerate launched this run with DeepSpeed settings but no DeepSpeed "
                          "config file; lmtune reads ZeRO's settings from such a file.",
                          "set deepspeed: path/to/ds_config.json in the YAML (see "
                          "examples/deepspeed/), or deepspeed_config_file in accelerate's config.")
    return path


def deepspeed_file(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed config file of the run, as written."""
    return _read_structured(deepspeed_path(cfg), "deepspeed")


def deepspeed_settings(cfg: RunConfig) -> dict[str, Any] | None:
    """`deepspeed: ds_config.json` -> {"stage": ZeRO stage, "offload_optimizer" / "offload_param":
    "cpu", "nvme" or None}, checked against the run's own batch, clipping and precision keys."""
    path = deepspeed_path(cfg)
    if not path:
        return None
    config = deepspeed_file(cfg)
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: {path} sets zero_optimization.stage {stage!r}.",
                          "use stage 2 or 3.")
    offload = {k: (zero.get(k) or {}).get("device") for k in ("offload_optimizer", "offload_param")}
    offload = {k: None if v in (None, "none") else v for k, v in offload.items()}
    if offload["offload_param"] and stage != 3:
        raise ConfigError(f"deepspeed: {path} offloads parameters with ZeRO stage {stage}; "
                          "DeepSpeed offloads parameters only at stage 3.",
                          "set zero_optimization.stage: 3, or remove offload_param.")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"deepspeed: {path} sets its own {section}; lmtune builds "
                              "the optimizer and the learning-rate schedule from the YAML (optim, "
                              "learning_rate, lr_scheduler_type), as LLaMA-Factory's examples do.",
                              f"remove the {section} section from the DeepSpeed file.")
    # The YAML owns these numbers; the DeepSpeed file may only say "auto" or agree.
    owned = {"train_micro_batch_size_per_gpu": (config.get("train_micro_batch_size_per_gpu"),
                                                cfg.per_device_train_batch_size),
             "gradient_accumulation_steps": (config.get("gradient_accumulation_steps"),
                                             cfg.gradient_accumulation_steps),
             "train_batch_size": (config.get("train_batch_size"), cfg.per_device_train_batch_size
                                  * cfg.gradient_accumulation_steps * world_size()),
             "gradient_clipping": (config.get("gradient_clipping"), cfg.max_grad_norm),
             "bf16.enabled": ((config.get("bf16") or {}).get("enabled"), cfg.bf16),
             "fp16.enabled": ((config.get("fp16") or {}).get("enabled"), cfg.fp16)}
    for key, (theirs, ours) in owned.items():
        if theirs not in (None, "auto", ours):
            raise ConfigError(f"deepspeed: {path} sets {key}: {theirs}, but the run has "
                              f"{ours}.", f'set {key}: "auto" in the DeepSpeed file.')
    return {"stage": stage} | offload


def engine(cfg: RunConfig) -> str:
    """The multi-process engine a run uses: "ddp", "fsdp2" or "deepspeed" ("single": one process).
    Refuses, naming what is missing, an engine or combination this machine cannot run."""
    ds, fsdp = deepspeed_settings(cfg), fsdp_settings(cfg)
    if ds and fsdp:
        raise ConfigError("both deepspeed and fsdp are set.", "keep one of them.")
    if ds and world_size() == 1 and not (torch.cuda.is_available() and (
            ds["offload_optimizer"] or ds["offload_param"])):
        # ZeRO partitions states over ranks: over one rank there is nothing to partition, and
        # with no GPU there is nothing to offload to the CPU either. The run is what it would be.
        return "single"
    if ds:
        _check_deepspeed_run(cfg, ds["stage"])
        return "deepspeed"
    if world_size() == 1:
        return "single"
    if fsdp:
        if cfg.quantization_bit:
            raise ConfigError("fsdp with quantization_bit: FSDP2 cannot shard bitsandbytes' packed "
                              "4/8-bit weights in this version.",
                              "remove quantization_bit (or fsdp: QLoRA trains with DDP).")
        if cfg.eval_generate_samples:
            raise ConfigError("fsdp with eval_generate_samples: generating answers needs the whole "
                              "model on one rank, and FSDP2 keeps it sharded.",
                              "set eval_generate_samples: 0 under fsdp (eval_loss is still "
                              "computed), or train with DDP.")
        return "fsdp2"
    return "ddp"


# Optimizers whose update of a weight depends on its shape (factored moments, orthogonalised or
# projected matrices, blocks chosen by layer): ZeRO flattens the weights it partitions.
_SHAPE_AWARE = {"use_muon": "Muon", "use_adam_mini": "Adam-mini", "use_galore": "GaLore",
                "use_apollo": "APOLLO", "use_badam": "BAdam"}


def _check_deepspeed_run(cfg: RunConfig, stage: int) -> None:
    """What a DeepSpeed ZeRO run over several processes cannot do, refused before anything loads."""
    import importlib.util

    where = f"deepspeed: ZeRO stage {stage} from {deepspeed_path(cfg)}"
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{where} needs the deepspeed package, which is not installed.",
                          "pip install 'lmtune[deepspeed]', or remove deepspeed (plain DDP).")
    shape_aware = [name for key, name in _SHAPE_AWARE.items() if getattr(cfg, key)]
    if cfg.optim == "adafactor":
        shape_aware.append("Adafactor")
    if shape_aware:
        raise ConfigError(f"{where} with {shape_aware[0]}: ZeRO hands the optimizer flat slices of "
                          "the weights, and this optimizer's update depends on each weight's shape.",
                          "use an element-wise optimizer (adamw_torch, the default), or fsdp.")
    if cfg.pure_bf16:
        raise ConfigError(f"{where} with pure_bf16: DeepSpeed keeps its own precision (its "
                          "bf16 section: bf16 weights with fp32 master copies).",
                          "remove pure_bf16; bf16: true sets the DeepSpeed file's bf16.")
    if cfg.finetuning_type == "adalora":
        raise ConfigError(f"{where} with finetuning_type: adalora: AdaLoRA scores each rank from "
                          "the adapter's gradients before every step, which ZeRO keeps "
                          "partitioned in its own buffers.", "use lora, or DDP (remove deepspeed).")
    if cfg.quantization_bit:
        raise ConfigError(f"{where} with quantization_bit: ZeRO does not partition "
                          "bitsandbytes' packed 4/8-bit weights in this version.",
                          "remove deepspeed (QLoRA trains with DDP), or remove quantization_bit.")
    if stage == 3 and cfg.eval_generate_samples:
        raise ConfigError(f"{where} with eval_generate_samples: generating answers needs the "
                          "whole model on one rank, and ZeRO-3 keeps it partitioned.",
                          "set eval_generate_samples: 0 (eval_loss is still computed), or use "
                          "ZeRO stage 2.")


def shard(root: torch.nn.Module, model: torch.nn.Module, cfg: RunConfig) -> None:
    """FSDP2: `fully_shard` each decoder layer of `model` (its gathered weights live only during
    that layer's forward and backward), then `root`, which holds the rest (embeddings, final norm,
    head). The same torch code runs on CUDA (nccl) and on the CPU (gloo)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    settings = fsdp_settings(cfg)
    names = settings["layer_classes"] or list(
        getattr(getattr(model, "lm", model), "_no_split_modules", None) or [])
    layers = [m for m in root.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"fsdp: the model has no layer of class {', '.join(names) or '(none named)'} "
                          "to shard.", "set fsdp_config: {fsdp_transformer_layer_cls_to_wrap: "
                          "<the decoder layer's class name>}.")
    options: dict[str, Any] = {"reshard_after_forward": settings["reshard_after_forward"]}
    if settings["cpu_offload"] and torch.cuda.is_available():  # on the CPU it already is there
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(root, **options)


@contextmanager
def accelerate_without_engines() -> Iterator[None]:
    """lmtune shards with `fully_shard` and starts DeepSpeed's engine itself; under `accelerate
    launch --config_file <FSDP or DeepSpeed>` the Accelerator must not wrap the model a second
    time, so it is built without those flags."""
    flags = {name: os.environ.pop(name) for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
             if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(flags)
