"""DeepSpeed ZeRO as the engine of a multi-process run (`deepspeed: ds_config.json` under torchrun,
`accelerate launch` or `lmtune train --nproc N`).

DeepSpeed does what it is made for: it partitions the optimizer states (ZeRO-1/2), the gradients
(ZeRO-2/3) and the weights (ZeRO-3) over the ranks, reduces the gradients, clips them
(gradient_clipping = max_grad_norm) and steps. lmtune's loop keeps what makes a run lmtune's: the
optimizer and the schedule from the YAML, the loss normalised over the whole window on all ranks
(so DeepSpeed's own division by the accumulation steps is off), the accumulation boundary (the
window's last micro-batch, set by the loop), the finite checks, atomic checkpoints (each rank writes
its partitions into the checkpoint's staging folder), and logs and the output written once.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from lmtune import distributed as dist
from lmtune.config import RunConfig
from lmtune.errors import ConfigError

# A checkpoint's DeepSpeed partitions live in this subfolder, beside the HF/PEFT weights.
FOLDER = "deepspeed"
TAG = "zero"
LAYOUT = "lmtune_layout.json"  # the world size and ZeRO stage that wrote the partitions


def config(cfg: RunConfig, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed file with every "auto" filled from the YAML (as HF's integration fills them),
    and lmtune's own optimizer allowed."""
    file = dist.deepspeed_file(cfg)
    micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    resolved = file | {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * dist.world_size(),
        "gradient_clipping": cfg.max_grad_norm or 0.0,
        "bf16": (file.get("bf16") or {}) | {"enabled": cfg.bf16},
        "fp16": (file.get("fp16") or {}) | {"enabled": cfg.fp16},
        "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
    }
    zero = dict(resolved.get("zero_optimization") or {})
    sizes = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    zero |= {key: sizes[key] for key, value in zero.items() if value == "auto" and key in sizes}
    if not torch.cuda.is_available():
        # On the CPU the states already live in CPU memory: there is nothing to offload to.
        for key in ("offload_optimizer", "offload_param"):
            if zero.pop(key, None) and dist.is_main():
                print(f"deepspeed: {key} is not applied on the CPU (the states are in CPU memory "
                      "already).")
    else:
        # lmtune's optimizer steps the offloaded fp32 partitions (DeepSpeed's CPU Adam is its own).
        resolved.setdefault("zero_force_ds_cpu_optimizer", False)
    resolved["zero_optimization"] = zero
    left = [key for key, value in _flatten(resolved) if value == "auto"]
    if left:
        raise ConfigError(f"deepspeed: {dist.deepspeed_path(cfg)} leaves {', '.join(left)} as \"auto\", which "
                          "lmtune does not fill.", "give those keys a value in the DeepSpeed file.")
    return resolved


def _flatten(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in config.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def initialize(root: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig,
               hidden_size: int) -> Any:
    """DeepSpeed's engine around `root` (the loss module), stepping `optimizer`: ZeRO wraps it, and
    the schedule keeps writing each group's learning rate into `optimizer`'s own groups, which the
    ZeRO optimizer steps with."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-step INFO lines
    # DeepSpeed calls collectives torch has renamed; the warnings are DeepSpeed's to act on.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    engine, _, _, _ = deepspeed.initialize(model=root, optimizer=optimizer,
                                           config=config(cfg, hidden_size),
                                           dist_init_required=False)
    return engine


def stage(engine: Any) -> int:
    return engine.zero_optimization_stage()


def whole_state(engine: Any, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """ZeRO-3: the whole weights of `model`, gathered one parameter at a time onto rank 0 (all
    ranks call it; the others get an empty dict). Below stage 3 every rank holds the whole weights:
    None."""
    if stage(engine) < 3:
        return None
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # a tied weight once, as the HF format keeps it
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if dist.is_main():
                state[name] = param.detach().cpu().clone()
    if dist.is_main():
        persistent = model.state_dict(keep_vars=True).keys()
        state |= {name: buffer.detach().cpu().clone() for name, buffer in model.named_buffers()
                  if name in persistent}
    return state


def local_values(param: torch.nn.Parameter) -> torch.Tensor:
    """The values of `param` this rank holds (ZeRO-3: its partition)."""
    return getattr(param, "ds_tensor", param)


def save(engine: Any, staging: Path) -> None:
    """Every rank writes its partitions of the trained weights and the optimizer state into the
    checkpoint's staging folder (all ranks call it); the frozen base is not repeated there."""
    folder = staging / FOLDER
    engine.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=True)
    if dist.is_main():
        (folder / LAYOUT).write_text(json.dumps({"world_size": dist.world_size(),
                                                 "stage": stage(engine)}))


def is_checkpoint(folder: Path) -> bool:
    return (folder / FOLDER).is_dir()


def check_layout(folder: Path, zero_stage: int | None) -> None:
    """Refuse to resume the partitions in `folder` anywhere but where they were cut: the same ZeRO
    stage on the same number of ranks (`zero_stage` None: this run has no DeepSpeed)."""
    layout = json.loads((folder / FOLDER / LAYOUT).read_text())
    if layout == {"world_size": dist.world_size(), "stage": zero_stage}:
        return
    now = (f"ZeRO stage {zero_stage} on {dist.world_size()} processes" if zero_stage is not None
           else f"{dist.world_size()} process(es) without deepspeed")
    raise ConfigError(
        f"cannot resume from {folder}: its DeepSpeed partitions were written by ZeRO stage "
        f"{layout['stage']} on {layout['world_size']} processes, and this run is {now}.",
        f"resume with the same deepspeed file on {layout['world_size']} processes; or start a "
        f"new run from the checkpoint's weights (adapter_name_or_path: {folder} for an "
        "adapter, model_name_or_path for a full fine-tune).")


def load(engine: Any, folder: Path) -> None:
    """Restore the partitions `save` wrote, after `check_layout`: nothing changes on a refusal."""
    check_layout(folder, stage(engine))
    engine.load_checkpoint(str(folder / FOLDER), tag=TAG, load_module_strict=False,
                           load_optimizer_states=True, load_lr_scheduler_states=False)
