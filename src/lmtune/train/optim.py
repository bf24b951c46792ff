"""The optimizer of a run: `optim` by HF Trainer's name, or Muon with AdamW beside it.

Parameters are grouped by (learning rate, decayed or not): the rate is the method's choice (LoRA+
gives B matrices their own) and biases and norm weights are not decayed. Groups at learning_rate
come first, so the logged lr is the base rate. Every optimizer here saves and restores its whole
state through state_dict, which the checkpoints hold.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtune.config import RunConfig
from lmtune.errors import ConfigError
from lmtune.models.methods import learning_rate_of

Group = dict[str, Any]


def _groups(named: list[tuple[str, torch.nn.Parameter]], cfg: RunConfig) -> list[Group]:
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in named:
        # Shrinking biases and norm weights toward 0 only hurts.
        decay = not (param.ndim < 2 or "norm" in name.lower())
        groups.setdefault((learning_rate_of(name, cfg), decay), []).append(param)
    order = sorted(groups, key=lambda key: (key[0] != cfg.learning_rate, not key[1]))
    return [{"params": groups[key], "lr": key[0], "weight_decay": cfg.weight_decay if key[1] else 0.0}
            for key in order]


def _adamw(groups: list[Group], cfg: RunConfig, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=fused or None)


def _bitsandbytes(groups: list[Group], cfg: RunConfig, bits: int, paged: bool) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    # On a CPU, bitsandbytes runs paged optimizers unpaged (it says so once): same update, no paging.
    return bnb.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                           eps=cfg.adam_epsilon, optim_bits=bits, is_paged=paged)


def _adafactor(groups: list[Group], cfg: RunConfig) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # As HF Trainer's `adafactor`: the run's own learning rate and schedule, not Adafactor's
    # relative step sizes.
    return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False)


# optim -> how it is built from the parameter groups (HF Trainer's names and settings).
OPTIMIZERS = {
    "adamw_torch": _adamw,
    "adamw_torch_fused": lambda groups, cfg: _adamw(groups, cfg, fused=True),
    "adafactor": _adafactor,
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.learning_rate),
    "adagrad": lambda groups, cfg: torch.optim.Adagrad(groups, lr=cfg.learning_rate),
    "rmsprop": lambda groups, cfg: torch.optim.RMSprop(groups, lr=cfg.learning_rate),
    "adamw_bnb_8bit": lambda groups, cfg: _bitsandbytes(groups, cfg, 8, paged=False),
    "adamw_8bit": lambda groups, cfg: _bitsandbytes(groups, cfg, 8, paged=False),
    "paged_adamw_8bit": lambda groups, cfg: _bitsandbytes(groups, cfg, 8, paged=True),
    "paged_adamw_32bit": lambda groups, cfg: _bitsandbytes(groups, cfg, 32, paged=True),
}


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden 2-D matrices and AdamW for every other parameter, as one optimizer: the
    schedule sets the learning rate of both (their groups are this optimizer's groups) and one
    state_dict holds both states."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = [muon, adamw]
        super().__init__([dict(g) for g in muon.param_groups + adamw.param_groups], {})
        self._share_groups()

    def _share_groups(self) -> None:
        # The parts step with the very group dicts the schedule writes each lr into.
        self.param_groups = [g for part in self.parts for g in part.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.parts[0].state_dict(), "adamw": self.parts[1].state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.parts[0].load_state_dict(state_dict["muon"])
        self.parts[1].load_state_dict(state_dict["adamw"])
        self._share_groups()


def is_muon_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """A hidden weight matrix: 2-D with both sides above 1 (IA3 stores its vectors as n x 1), not
    an embedding or the output head (their rows are looked up one token at a time, which Muon's
    orthogonalised whole-matrix update does not suit)."""
    return param.ndim == 2 and min(param.shape) > 1 and "embed" not in name and "lm_head" not in name


def _muon(named: list[tuple[str, torch.nn.Parameter]], cfg: RunConfig) -> torch.optim.Optimizer:
    matrices = [(n, p) for n, p in named if is_muon_matrix(n, p)]
    rest = [(n, p) for n, p in named if not is_muon_matrix(n, p)]
    if not matrices:
        raise ConfigError(f"use_muon: finetuning_type {cfg.finetuning_type} trains no hidden 2-D "
                          "matrix, so Muon would have nothing to do.",
                          "remove use_muon, or use finetuning_type full, freeze, lora or oft.")
    # match_rms_adamw scales Muon's update to AdamW's typical size, so one learning_rate and
    # weight_decay suit both parts.
    muon = torch.optim.Muon(_groups(matrices, cfg), lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    adamw = _adamw(_groups(rest, cfg), cfg) if rest else None
    if adamw is None:
        return muon
    return MuonWithAdamW(muon, adamw)


def _adam_mini(named: list[tuple[str, torch.nn.Parameter]], model: torch.nn.Module,
               cfg: RunConfig) -> torch.optim.Optimizer:
    try:
        from adam_mini import Adam_mini
    except ImportError:
        raise ConfigError("use_adam_mini needs the adam-mini package, which is not installed.",
                          "pip install 'lmtune[optimizers]' (or adam-mini==1.1.1).") from None
    config = getattr(model, "lm", model).config
    # Adam-mini finds its blocks (heads, neurons, tokens) by the weights' names and the model's
    # shape; it decays every matrix and no norm or bias, as the other optimizers here.
    return Adam_mini(named_parameters=named, lr=cfg.learning_rate,
                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                     weight_decay=cfg.weight_decay, dim=config.hidden_size,
                     n_heads=config.num_attention_heads,
                     n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The run's optimizer over the model's trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.use_muon:
        return _muon(named, cfg)
    if cfg.use_adam_mini:
        return _adam_mini(named, model, cfg)
    return OPTIMIZERS[cfg.optim](_groups(named, cfg), cfg)


def state_bytes(model: torch.nn.Module, cfg: RunConfig) -> int:
    """The optimizer state the run's optimizer keeps for the model's trainable parameters, in bytes
    (for `lmtune plan`; a meta model's shapes suffice)."""
    total = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        n, width = param.numel(), 2 if cfg.pure_bf16 else param.element_size()
        if cfg.use_muon:
            total += n * width * (1 if is_muon_matrix(name, param) else 2)  # momentum; AdamW's two
        elif cfg.use_adam_mini:  # the first moment; one second moment per block is negligible
            total += n * width
        elif cfg.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
            # bitsandbytes keeps tensors under 4096 values in 32 bits.
            total += 2 * n if n >= 4096 else 8 * n
        elif cfg.optim == "paged_adamw_32bit":
            total += 8 * n
        elif cfg.optim == "adafactor":  # a factored second moment: one value per row and column
            total += 4 * (sum(param.shape) if param.ndim == 2 else n)
        else:
            total += n * width * {"sgd": 0, "adagrad": 1, "rmsprop": 1}.get(cfg.optim, 2)
    return total
