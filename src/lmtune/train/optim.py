"""The optimizer of a run: `optim` by HF Trainer's name, Muon with AdamW beside it, Adam-mini,
GaLore, APOLLO or BAdam (each from its own package).

Parameters are grouped by (learning rate, decayed or not): the rate is the method's choice (LoRA+
gives B matrices their own) and biases and norm weights are not decayed. Groups at learning_rate
come first, so the logged lr is the base rate. Every optimizer here saves and restores its whole
state through state_dict, which the checkpoints hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from lmtune.config import RunConfig
from lmtune.errors import ConfigError
from lmtune.models.methods import learning_rate_of, resolve_targets

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


class OptimizerOfParts(torch.optim.Optimizer):
    """Several optimizers acting as one: the schedule sets each part's learning rate through this
    optimizer's groups, which are the parts' own group dicts."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts
        super().__init__([dict(g) for part in parts for g in part.param_groups], {})
        self._share_groups()

    def _share_groups(self) -> None:
        # The parts step with the very group dicts the schedule writes each lr into (loading a
        # part's state replaces its dicts, so this runs again after a load).
        self.param_groups = [g for part in self.parts for g in part.param_groups]


class MuonWithAdamW(OptimizerOfParts):
    """Muon for the hidden 2-D matrices and AdamW for every other parameter, as one optimizer: one
    state_dict holds both states."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        super().__init__([muon, adamw])

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


def projected_weights(model: torch.nn.Module, target: str, key: str) -> set[str]:
    """Names of the trainable weights of the linear layers named by a GaLore / APOLLO target
    ('all': every linear layer but the output head)."""
    lm = getattr(model, "lm", model)  # a reward model's backbone
    leaves = set(resolve_targets(lm, target, key))
    head = lm.get_output_embeddings()
    return {f"{module_name}.weight" if module_name else "weight"
            for module_name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
            and module_name.rsplit(".", 1)[-1] in leaves and module.weight.requires_grad}


def projection_settings(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """GaLore's or APOLLO's target layers, and the settings of the parameter group it projects
    (the optimizers read them from the group)."""
    if cfg.use_galore:
        return cfg.galore_target, {"rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_interval,
                                   "scale": cfg.galore_scale, "proj_type": cfg.galore_proj_type}
    return cfg.apollo_target, {"rank": cfg.apollo_rank, "update_proj_gap": cfg.apollo_update_interval,
                               "scale": cfg.apollo_scale, "proj_type": cfg.apollo_proj_type,
                               "proj": cfg.apollo_proj, "scale_type": cfg.apollo_scale_type}


def _keep_projectors_in_checkpoints(optimizer: torch.optim.Optimizer,
                                    make_projector: Callable[[Group, dict], Any]) -> None:
    """GaLore and APOLLO keep each weight's projection in a Python object in the optimizer state.
    Checkpoints hold tensors and plain numbers only (read back with weights_only), so the object
    is saved as its tensors and numbers (its strings are the group's settings) and rebuilt by the
    optimizer's own constructor on load: a resumed run goes on with the same projections."""

    def to_plain(_optimizer, state_dict):
        # state_dict() shares the live per-parameter dicts: build new ones, never mutate those.
        state_dict["state"] = {
            index: {**state, "projector": {k: v for k, v in vars(state["projector"]).items()
                                           if not isinstance(v, str)}}
            if "projector" in state else state
            for index, state in state_dict["state"].items()}
        return state_dict

    def rebuild(loaded):
        for group in loaded.param_groups:
            for param in group["params"]:
                state = loaded.state.get(param, {})
                if isinstance(state.get("projector"), dict):
                    saved = state["projector"]
                    state["projector"] = make_projector(group, state)
                    vars(state["projector"]).update(saved)

    optimizer.register_state_dict_post_hook(to_plain)
    optimizer.register_load_state_dict_post_hook(rebuild)


def _projected(named: list[tuple[str, torch.nn.Parameter]], model: torch.nn.Module,
               cfg: RunConfig) -> torch.optim.Optimizer:
    """GaLore or APOLLO: the target linear weights in a group of their own that carries the
    projection settings (the optimizers project only groups with a rank); the rest as usual."""
    try:
        if cfg.use_galore:
            from galore_torch import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
            from galore_torch.galore_projector import GaLoreProjector
        else:
            from apollo_torch import APOLLOAdamW
    except ImportError:
        package = "galore-torch==1.0" if cfg.use_galore else "apollo-torch==1.0.3"
        raise ConfigError(f"use_{'galore' if cfg.use_galore else 'apollo'} needs the "
                          f"{package.split('==')[0]} package, which is not installed.",
                          f"pip install 'lmtune[optimizers]' (or {package}).") from None
    name = "galore" if cfg.use_galore else "apollo"
    target, settings = projection_settings(cfg)
    projected = projected_weights(model, target, f"{name}_target")
    if not projected:
        raise ConfigError(f"use_{name}: no trainable linear weight matches {name}_target: "
                          f"{target}.", f"name trained linear layers in {name}_target, or use all.")
    groups = _groups([(n, p) for n, p in named if n not in projected], cfg)
    groups.append({"params": [p for n, p in named if n in projected], "lr": cfg.learning_rate,
                   "weight_decay": cfg.weight_decay, **settings})
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.use_apollo:
        def make(groups: list[Group]) -> torch.optim.Optimizer:
            optimizer = APOLLOAdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                    scale_front=cfg.apollo_scale_front)
            _keep_projectors_in_checkpoints(optimizer, optimizer._initialize_projector)
            return optimizer
    else:
        if cfg.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit") and not torch.cuda.is_available():
            raise ConfigError(f"use_galore with optim: {cfg.optim}: GaLore's 8-bit AdamW "
                              "synchronises CUDA at every step and runs on a GPU only.",
                              "use optim: adamw_torch or adafactor with GaLore on this machine.")

        def make(groups: list[Group]) -> torch.optim.Optimizer:
            if cfg.optim == "adafactor":
                optimizer = GaLoreAdafactor(groups, lr=cfg.learning_rate, scale_parameter=False,
                                            relative_step=False)
            elif cfg.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
                optimizer = GaLoreAdamW8bit(groups, lr=cfg.learning_rate, betas=betas,
                                            eps=cfg.adam_epsilon, is_paged=cfg.optim.startswith("paged"))
            else:
                optimizer = GaLoreAdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                        no_deprecation_warning=True)
            _keep_projectors_in_checkpoints(optimizer, lambda group, state: GaLoreProjector(
                group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                proj_type=group["proj_type"]))
            return optimizer
    if cfg.galore_layerwise or cfg.apollo_layerwise:
        if cfg.max_grad_norm:
            print(f"max_grad_norm: {cfg.max_grad_norm} is not applied: layer-wise {name} updates "
                  "each weight as soon as its gradient is complete, before the norm of the whole "
                  "gradient is known (the log's grad_norm is that norm, unclipped).")
        parts = []
        for index, (group, param) in enumerate(((g, p) for g in groups for p in g["params"]), 1):
            part = make([{**group, "params": [param]}])
            if "seed" in part.state.get(param, {}):
                # APOLLO seeds each weight's random projection by the weight's place in its
                # optimizer: the place among all weights, as one optimizer would have it.
                part.state[param]["seed"] = index
            parts.append((param, part))
        return LayerwiseOptimizer(parts)
    return make(groups)


class LayerwiseOptimizer(OptimizerOfParts):
    """Layer-wise GaLore / APOLLO: one optimizer per weight, stepped the moment that weight's
    gradient is complete in the backward pass, which then frees the gradient, so the model's
    gradients never exist all at once. The loop's step() finds nothing left to do. The schedule
    sets the rate in the per-weight optimizers' groups (they are this optimizer's groups); one
    state_dict holds every part. The gradient norm is summed as the gradients pass, for the loop's
    finite-gradient check and its log; it cannot clip, the weights have moved already."""

    def __init__(self, parts: list[tuple[torch.nn.Parameter, torch.optim.Optimizer]]):
        super().__init__([optimizer for _, optimizer in parts])
        self._squares: torch.Tensor | float = 0.0
        self._stepped: set[int] = set()
        for param, optimizer in parts:
            param.register_post_accumulate_grad_hook(self._stepper(optimizer))

    def _stepper(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.nn.Parameter], None]:
        def step_now(param: torch.nn.Parameter) -> None:
            if id(param) in self._stepped:
                raise RuntimeError("layer-wise optimizer: a second backward pass before the "
                                   "optimizer step would accumulate into a weight already updated")
            self._stepped.add(id(param))
            self._squares = self._squares + param.grad.detach().float().square().sum()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step_now

    def grad_norm(self) -> float:
        """The norm of the gradients the last backward pass applied; the next pass starts anew."""
        norm = float(self._squares) ** 0.5
        self._squares, self._stepped = 0.0, set()
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"layerwise": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, state in zip(self.parts, state_dict["layerwise"], strict=True):
            part.load_state_dict(state)
        self._share_groups()


def _badam(named: list[tuple[str, torch.nn.Parameter]], cfg: RunConfig) -> torch.optim.Optimizer:
    """BAdam's BlockOptimizer over `optim` (AdamW by default): it trains one decoder layer at a
    time, turning requires_grad off elsewhere, keeping an fp32 copy of that layer only, and
    restarting the inner optimizer's state at each switch."""
    try:
        from badam import BlockOptimizer
    except ImportError:
        raise ConfigError("use_badam needs the badam package, which is not installed.",
                          "pip install 'lmtune[optimizers]' (or badam==1.4).") from None
    block = BlockOptimizer(
        base_optimizer=OPTIMIZERS[cfg.optim](_groups(named, cfg), cfg), named_parameters_list=named,
        switch_block_every=cfg.badam_switch_interval, start_block=cfg.badam_start_block,
        switch_mode=cfg.badam_switch_mode, verbose=cfg.badam_verbose)
    _resume_badam_where_it_was(block)
    return block


def _resume_badam_where_it_was(block: torch.optim.Optimizer) -> None:
    """BlockOptimizer's own state_dict is the inner optimizer's alone: a resumed run would start
    again at the first layer with a fresh switch count and the first learning rate. Its state here
    also holds the step count, the layer in training, in random order the layers still to come,
    and the rates the schedule had set."""
    inner = block.base_optimizer

    def state_dict() -> dict[str, Any]:
        # No always-active modules are given, so the active prefixes are exactly one block's.
        active = block.block_prefix_list.index(block.active_param_prefixs)
        return {"global_step": block.global_step, "active_block": active,
                # the next layer (already drawn in random order) and those after it
                "next_block": block.current_block_idx,
                "block_order": list(getattr(block, "block_order", [])),
                # The schedule writes the rate into the outer groups, copied inward at each step.
                "learning_rates": [group["lr"] for group in block.param_groups],
                "inner": inner.state_dict()}

    def load_state_dict(state: dict[str, Any]) -> None:
        block.global_step = state["global_step"]
        if block.switch_mode == "random":
            # Switching draws the next layer from the end of the order: the saved one.
            block.block_order = [*state["block_order"], state["next_block"]]
        for group, rate in zip(block.param_groups, state["learning_rates"]):
            group["lr"] = rate
        block.current_block_idx = state["active_block"]
        block.switch_trainable_params(verbose=0)  # a fresh fp32 copy of the restored weights
        inner.load_state_dict(state["inner"])

    block.state_dict = state_dict
    block.load_state_dict = load_state_dict


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The run's optimizer over the model's trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.use_muon:
        return _muon(named, cfg)
    if cfg.use_adam_mini:
        return _adam_mini(named, model, cfg)
    if cfg.use_galore or cfg.use_apollo:
        return _projected(named, model, cfg)
    if cfg.use_badam:
        return _badam(named, cfg)
    return OPTIMIZERS[cfg.optim](_groups(named, cfg), cfg)


def state_bytes(model: torch.nn.Module, cfg: RunConfig) -> int:
    """The optimizer state the run's optimizer keeps for the model's trainable parameters, in bytes
    (for `lmtune plan`; a meta model's shapes suffice)."""
    total = 0
    projected = set()
    if cfg.use_galore or cfg.use_apollo:
        target, settings = projection_settings(cfg)
        projected = projected_weights(model, target, "galore_target" if cfg.use_galore else "apollo_target")
        rank = settings["rank"]
    if cfg.use_badam:
        # One decoder layer trains at a time (embeddings and head stay frozen): its two moments
        # and its fp32 copy, for the largest layer.
        layers: dict[str, int] = {}
        for name, param in model.named_parameters():
            if (found := re.search(r"\.layers\.(\d+)\.", name)) and param.requires_grad:
                layers[found.group(1)] = layers.get(found.group(1), 0) + param.numel()
        return 12 * max(layers.values(), default=0)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        n, width = param.numel(), 2 if cfg.pure_bf16 else param.element_size()
        if name in projected:
            # Two moments of the (long side x rank) projected gradient, and the projection
            # itself (rank x short side).
            r = min(rank, *param.shape)
            total += (2 * max(param.shape) + min(param.shape)) * r * width
        elif cfg.use_muon:
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
