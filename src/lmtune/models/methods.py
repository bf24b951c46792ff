"""finetuning_type -> which parameters train, and what a method needs from the training loop.

full and freeze train the model's own weights. Every other method wraps the model in a peft adapter:
lora (with rsLoRA, DoRA, PiSSA initialisation, LoRA+ learning rates, extra fully trained modules),
oft (orthogonal rotations of each target's input), adalora, ia3, and the prompt-side methods prefix, prompt and ptuning, whose virtual tokens exist only
inside peft's forward. A quantized base (quantization_bit) is frozen in 4 or 8 bits and takes an
adapter. Adapters are saved in the PEFT format, so `load_adapters` reloads any of them for chat.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from peft import (AdaLoraConfig, IA3Config, LoraConfig, OFTConfig, PeftConfig, PeftModel,
                  PrefixTuningConfig,
                  PromptEncoderConfig, PromptTuningConfig, get_peft_model,
                  prepare_model_for_kbit_training)
from transformers import AutoTokenizer, PreTrainedModel

from lmtune import distributed
from lmtune.config import RunConfig, split_list
from lmtune.errors import ConfigError, ModelError
from lmtune.models.lineage import check_adapter, note_merged, record_base
from lmtune.models.load import fit_vocab, is_quantized, resolve_adapter, trains_vocab
from lmtune.models.precision import computes_in_fp32, half_frozen_base, settle_dtypes, stored_half

log = logging.getLogger(__name__)

# finetuning_type -> the peft_type its adapter_config.json records.
PEFT_TYPES = {"lora": "LORA", "oft": "OFT", "adalora": "ADALORA", "ia3": "IA3", "prefix": "PREFIX_TUNING",
              "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}
# Adapters that change weights (W + BA, W R, W * l) can be merged into them; virtual tokens cannot.
MERGEABLE = {"LORA", "OFT", "ADALORA", "IA3"}


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of transformer blocks (model.model.layers for Llama-style models)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__} for "
                         "finetuning_type: freeze.", "use finetuning_type: lora or full.")
    return layers


def all_linear_names(model: PreTrainedModel) -> list[str]:
    """Leaf names of every linear layer except the output head: what lora_target: all means.
    (A quantized base's linear layers are bitsandbytes subclasses of nn.Linear.)"""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


def resolve_targets(model: PreTrainedModel, value: str, key: str) -> list[str]:
    """'all' or a comma list of module leaf names -> leaf names that exist in the model."""
    targets = split_list(value)
    if targets == ["all"]:
        return all_linear_names(model)
    known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ConfigError(f"{key}: no module named {', '.join(unknown)} in {type(model).__name__}.",
                          f"use 'all' or names among: {', '.join(all_linear_names(model))}.")
    return targets


def _modules_named(model: torch.nn.Module, leaf_names: list[str], key: str,
                   outside_layers: bool = False) -> dict[str, torch.nn.Module]:
    """Full name -> module for every module whose last name part is one of `leaf_names`."""
    skip = ()
    if outside_layers:
        layers = decoder_layers(model)
        skip = (next(n for n, m in model.named_modules() if m is layers) + ".",)
    candidates = {n: m for n, m in model.named_modules() if n and not n.startswith(skip)}
    found = {n: m for n, m in candidates.items() if n.rsplit(".", 1)[-1] in leaf_names}
    missing = [t for t in leaf_names if not any(n.rsplit(".", 1)[-1] == t for n in found)]
    if missing:
        holders = sorted({n.rsplit(".", 1)[-1] for n, m in candidates.items()
                          if list(m.parameters(recurse=False))})
        where = " outside the decoder layers" if outside_layers else ""
        raise ConfigError(f"{key}: no module named {', '.join(missing)}{where}.",
                          f"use names among: {', '.join(holders)}.")
    return found


# --- full and freeze ------------------------------------------------------------------------------

def apply_freeze(model: PreTrainedModel, cfg: RunConfig) -> None:
    layers = decoder_layers(model)
    n = cfg.freeze_trainable_layers
    if n == 0 or abs(n) > len(layers):
        raise ConfigError(f"freeze_trainable_layers: {n}, but the model has {len(layers)} layers.",
                          f"use a value from 1 to {len(layers)} (last layers) or -1 to -{len(layers)} "
                          "(first layers).")
    if cfg.use_llama_pro:
        if n < 0 or len(layers) % n:
            raise ConfigError(f"use_llama_pro with freeze_trainable_layers: {n}: LLaMA-Pro trains "
                              f"the blocks expansion added, one in each of n equal groups of the "
                              f"model's {len(layers)} layers.",
                              "set freeze_trainable_layers to the number of added blocks (it "
                              f"divides {len(layers)}).")
        stride = len(layers) // n
        chosen = range(stride - 1, len(layers), stride)  # each group's last layer: the added one
    else:
        chosen = range(len(layers) - n, len(layers)) if n > 0 else range(0, -n)
    modules = split_list(cfg.freeze_trainable_modules)
    extra = _modules_named(model, split_list(cfg.freeze_extra_modules), "freeze_extra_modules",
                           outside_layers=True)
    model.requires_grad_(False)
    for index in chosen:
        layer = layers[index]
        if modules == ["all"]:
            layer.requires_grad_(True)
            continue
        for module in modules:
            found = [m for name, m in layer.named_modules() if name.split(".")[-1] == module]
            if not found:
                children = sorted({name.split(".")[0] for name, _ in layer.named_children()})
                raise ConfigError(f"freeze_trainable_modules: no module '{module}' in decoder layer "
                                  f"{index}.", f"use 'all' or names among: {', '.join(children)}.")
            for m in found:
                m.requires_grad_(True)
    for module in extra.values():
        module.requires_grad_(True)


# --- adapter configs ------------------------------------------------------------------------------

def _modules_to_save(model: PreTrainedModel, cfg: RunConfig) -> list[str] | None:
    # peft matches modules_to_save by plain name ending ("norm" would also catch input_layernorm),
    # so the modules named by the user are handed over as full names.
    if not cfg.additional_target:
        if trains_vocab(cfg):  # as LLaMA-Factory: the grown embeddings and head train in full
            heads = (model.get_input_embeddings(), model.get_output_embeddings())
            return sorted(name for name, module in model.named_modules() if module in heads)
        return None
    return sorted(_modules_named(model, split_list(cfg.additional_target), "additional_target"))


def _keeps_tying(model: PreTrainedModel, cfg: RunConfig) -> bool:
    # A tied embedding and head trained as two separate copies would come apart, and a merged
    # export (still tied in its config) would keep only one of them; peft can train them as one.
    return trains_vocab(cfg) and not cfg.additional_target and bool(model.config.tie_word_embeddings)


def lora_config(model: PreTrainedModel, cfg: RunConfig) -> LoraConfig:
    init: bool | str = True
    if cfg.pissa_init:
        init = "pissa" if cfg.pissa_iter == -1 else f"pissa_niter_{cfg.pissa_iter}"
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_lora_alpha,
                      lora_dropout=cfg.lora_dropout,
                      target_modules=resolve_targets(model, cfg.lora_target, "lora_target"),
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=init,
                      modules_to_save=_modules_to_save(model, cfg), task_type="CAUSAL_LM",
                      ensure_weight_tying=_keeps_tying(model, cfg))


def oft_config(model: PreTrainedModel, cfg: RunConfig) -> OFTConfig:
    targets = resolve_targets(model, cfg.oft_target, "oft_target")
    # peft would quietly pick another block size for a layer whose input width it does not divide;
    # the run trains what the config says or stops.
    key, value = ("oft_block_size", cfg.oft_block_size) if cfg.oft_block_size else ("oft_rank", cfg.oft_rank)
    widths = sorted({m.in_features for n, m in model.named_modules()
                     if n.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features")})
    misfits = [w for w in widths if w % value]
    if misfits:
        common = math.gcd(*widths)
        raise ConfigError(f"{key}: {value} does not divide the input width of every oft_target "
                          f"layer ({', '.join(map(str, misfits))}).",
                          f"use a divisor of {common} (the widths' common divisor), e.g. {key}: "
                          f"{max(d for d in (32, 16, 8, 4, 2, 1) if common % d == 0)}.")
    return OFTConfig(r=cfg.oft_rank, oft_block_size=cfg.oft_block_size,
                     module_dropout=cfg.module_dropout, target_modules=targets,
                     modules_to_save=_modules_to_save(model, cfg), task_type="CAUSAL_LM")


def adalora_config(model: PreTrainedModel, cfg: RunConfig) -> AdaLoraConfig:
    # peft wants the run's length now, but it is known only once the data is encoded; the loop sets
    # the real value through AdaLoraHooks before the first step. This placeholder only has to pass
    # peft's check that the schedule leaves room for a budgeting phase.
    placeholder_steps = cfg.adalora_tinit + cfg.adalora_tfinal + 1
    return AdaLoraConfig(init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r,
                         tinit=cfg.adalora_tinit, tfinal=cfg.adalora_tfinal,
                         deltaT=cfg.adalora_deltaT, orth_reg_weight=cfg.adalora_orth_reg_weight,
                         total_step=placeholder_steps,
                         lora_alpha=cfg.lora_alpha or 2 * cfg.adalora_init_r,
                         lora_dropout=cfg.lora_dropout,
                         target_modules=resolve_targets(model, cfg.lora_target, "lora_target"),
                         modules_to_save=_modules_to_save(model, cfg), task_type="CAUSAL_LM")


def ia3_config(model: PreTrainedModel, cfg: RunConfig) -> IA3Config:
    if cfg.ia3_target is None:  # peft's per-architecture default: keys, values and the FFN input
        return IA3Config(modules_to_save=_modules_to_save(model, cfg), task_type="CAUSAL_LM")
    targets = resolve_targets(model, cfg.ia3_target, "ia3_target")
    # IA3 scales the output of attention projections but the input of feed-forward ones (the
    # paper's l_ff sits on the FFN's inner activation), so peft must know which targets are which.
    feedforward = {name.rsplit(".", 1)[-1] for name, _ in decoder_layers(model)[0].named_modules()
                   if name.startswith("mlp.")}
    return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t in feedforward],
                     modules_to_save=_modules_to_save(model, cfg), task_type="CAUSAL_LM")


def prompt_config(model: PreTrainedModel, cfg: RunConfig) -> PeftConfig:
    common = {"num_virtual_tokens": cfg.num_virtual_tokens, "task_type": "CAUSAL_LM"}
    if cfg.finetuning_type == "prefix":
        return PrefixTuningConfig(prefix_projection=cfg.prefix_projection,
                                  encoder_hidden_size=cfg.encoder_hidden_size or model.config.hidden_size,
                                  **common)
    if cfg.finetuning_type == "ptuning":
        return PromptEncoderConfig(encoder_hidden_size=cfg.encoder_hidden_size or model.config.hidden_size,
                                   encoder_reparameterization_type=cfg.encoder_reparameterization_type,
                                   **common)
    if cfg.prompt_tuning_init == "text":
        # peft tokenizes the text with the tokenizer stored next to the base model's weights.
        return PromptTuningConfig(prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=cfg.prompt_tuning_init_text,
                                  tokenizer_name_or_path=model.name_or_path, **common)
    return PromptTuningConfig(prompt_tuning_init="RANDOM", **common)


def adapter_config(model: PreTrainedModel, cfg: RunConfig) -> PeftConfig:
    """The peft config of a new adapter for cfg.finetuning_type."""
    if cfg.finetuning_type == "lora":
        return lora_config(model, cfg)
    if cfg.finetuning_type == "oft":
        return oft_config(model, cfg)
    if cfg.finetuning_type == "adalora":
        return adalora_config(model, cfg)
    if cfg.finetuning_type == "ia3":
        return ia3_config(model, cfg)
    return prompt_config(model, cfg)


# --- loading adapters -----------------------------------------------------------------------------

def adapter_type(path: str) -> str:
    """The peft_type an adapter folder records (LORA, IA3, PREFIX_TUNING, ...)."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise ModelError(f"adapter_name_or_path: {path} holds no adapter_config.json.",
                         "point to a folder written by lmtune train (an adapter method) or peft.")
    try:
        return str(json.loads(config_file.read_text(encoding="utf-8"))["peft_type"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{config_file} is not a PEFT adapter config (no peft_type).",
                         "point to a folder written by lmtune train or peft.") from None


def load_adapters(model: PreTrainedModel, paths: list[str], trainable_last: bool,
                  merge_last: bool = False):
    """Load PEFT adapters in order. All but the last are merged into the base weights; the last stays
    an adapter (trainable when `trainable_last`) unless `merge_last`. Each must have been trained on
    the weights it goes on (models/lineage.py: check_adapter)."""
    paths = [resolve_adapter(p) for p in paths]
    for i, path in enumerate(paths):
        folder = Path(path)
        if (folder / "adapter_config.json").is_file() and not (folder / "adapter_model.safetensors").is_file():
            raise ModelError(f"adapter_name_or_path: {path} has no adapter_model.safetensors; "
                             "lmtune reads adapter weights only as safetensors, never as pickles.",
                             "save the adapter with peft's save_pretrained(safe_serialization=True).")
        kind = adapter_type(path)
        last = i == len(paths) - 1
        merge = merge_last or not last
        if merge and kind not in MERGEABLE:
            raise ModelError(f"adapter {path} is a {kind} adapter: its virtual tokens live outside "
                             "the weights, so it cannot be merged into them.",
                             "list it last in adapter_name_or_path (and do not set "
                             "create_new_adapter), or use it on its own.")
        check_adapter(model, path)
        if (folder / "tokenizer_config.json").is_file():
            # An adapter trained with new tokens carries their embedding rows (modules_to_save):
            # the base grows to its tokenizer's length first, as it did in training.
            fit_vocab(model, len(AutoTokenizer.from_pretrained(folder)))
        try:
            model = PeftModel.from_pretrained(model, path, is_trainable=last and trainable_last)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"adapter {path} does not fit this base model: {str(exc).splitlines()[0]}",
                             "use the base model the adapter was trained on.") from None
        if merge:
            model = model.merge_and_unload()
            note_merged(model, path)
    if not trainable_last and isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        model.generate = partial(generate_with_virtual_tokens, model)
    return model


def generate_with_virtual_tokens(model: PeftModel, input_ids: torch.Tensor,
                                 attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """generate() for prefix, prompt and ptuning adapters: the prompt ids followed by new tokens.

    peft 0.21's own generate for these methods disagrees with their training forward under
    transformers 5.24 (measured: a prefix is dropped once the KV cache starts, prompt tokens shift
    positions after the first new token). Here the base model generates with the virtual tokens
    made explicit, which matches the forward step for step: prompt and ptuning embeddings go in
    front of the text's embeddings; a prefix becomes a pre-filled KV cache, with filler ids that
    hold its places (generate skips ids the cache already covers)."""
    config, base = model.active_peft_config, model.get_base_model()
    batch, n = input_ids.shape[0], config.num_virtual_tokens
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    if config.peft_type == "PREFIX_TUNING":
        fillers = input_ids.new_full((batch, n), kwargs.get("pad_token_id") or 0)
        out = base.generate(input_ids=torch.cat([fillers, input_ids], dim=1), attention_mask=mask,
                            cache=model.get_prompt(batch), **kwargs)
        return out[:, n:]
    text = base.get_input_embeddings()(input_ids)
    embeds = torch.cat([model.get_prompt(batch).to(text.dtype), text], dim=1)
    new = base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)  # new tokens only
    return torch.cat([input_ids, new], dim=1)


def _continue_adapters(model: PreTrainedModel, cfg: RunConfig):
    """adapter_name_or_path while training: continue the last adapter, or merge all and start anew."""
    if is_quantized(model) and (len(cfg.adapter_paths) > 1 or cfg.create_new_adapter):
        raise ConfigError("adapter_name_or_path would merge adapters into the quantized base "
                          f"(quantization_bit: {cfg.quantization_bit}), which rounds the merge.",
                          "give a single adapter to continue, or export the merged model first "
                          "(lmtune export) and train on that.")
    if cfg.create_new_adapter:
        model = load_adapters(model, cfg.adapter_paths, trainable_last=False, merge_last=True)
        return get_peft_model(model, adapter_config(model, cfg))
    last = resolve_adapter(cfg.adapter_paths[-1])
    if adapter_type(last) != PEFT_TYPES[cfg.finetuning_type]:
        raise ConfigError(f"adapter_name_or_path: {last} is a {adapter_type(last)} adapter, but "
                          f"finetuning_type is {cfg.finetuning_type}.",
                          f"set the finetuning_type it was trained with, or create_new_adapter: true "
                          f"to merge it and train a new {cfg.finetuning_type} adapter.")
    if adapter_type(last) not in MERGEABLE:
        # peft saves the virtual tokens an encoder produced, not the encoder, and refuses to load
        # such an adapter as trainable.
        raise ConfigError(f"adapter_name_or_path: {last} is a {adapter_type(last)} adapter, and peft "
                          "cannot continue training one.",
                          f"train a new {cfg.finetuning_type} adapter (remove adapter_name_or_path).")
    return load_adapters(model, cfg.adapter_paths, trainable_last=True)


# --- quantized base -------------------------------------------------------------------------------

def quantized_base(model: PreTrainedModel) -> PreTrainedModel:
    """The base bitsandbytes quantized as it loaded (load_model's `quantization`), ready for
    adapter training."""
    # peft's default would also turn on gradient checkpointing, ~30% slower on a CPU; the loop turns
    # it on when gradient_checkpointing says so. Norms and other small weights stay in fp32.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _bnb_4bit_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    # bitsandbytes' own layers only: peft's adapter wrappers around them expose the same weight.
    for name, module in model.named_modules():
        if type(module).__module__.startswith("bitsandbytes") and \
                hasattr(getattr(module, "weight", None), "quant_state"):
            yield name, module


def check_untouched_4bit(model: torch.nn.Module) -> None:
    """Refuse to train a 4-bit model that already ran an inference forward in this process.

    On CPUs with avx512_bf16, bitsandbytes repacks 4-bit weights for a fast inference kernel the
    first time an eval-mode layer sees an input without grad (generate, or an eval pass), and keeps
    them repacked. Backward through the repacked weights has no autograd kernel: adapter gradients
    come out wrong and the loss stops falling, silently."""
    for name, module in _bnb_4bit_layers(model):
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise ModelError(f"the 4-bit weight of {name} was repacked for CPU inference (the model "
                             "generated or was evaluated before training), and training through it "
                             "would compute wrong gradients.",
                             "load the quantized model afresh and train it before any generate() "
                             "or eval-mode forward.")


@contextmanager
def evaluation(model: torch.nn.Module) -> Iterator[None]:
    """model.eval() for an eval pass during training, except for 4-bit layers: their training flag
    only decides whether bitsandbytes repacks their weights for inference (see
    check_untouched_4bit), so they keep it and training can go on afterwards."""
    model.eval()
    for _, module in _bnb_4bit_layers(model):
        module.training = True  # this layer only: its children (none) and wrappers keep eval mode
    try:
        yield
    finally:
        model.train()


# --- the method -----------------------------------------------------------------------------------

def apply_method(model: PreTrainedModel, cfg: RunConfig):
    """Mark what trains for cfg.finetuning_type; returns the (possibly PEFT-wrapped) model."""
    if cfg.quantization_bit is not None:
        if not is_quantized(model):
            raise ModelError(f"quantization_bit: {cfg.quantization_bit}, but the base was loaded in "
                             "full precision.", "load it with load_model(..., quantization="
                             "quantization_config(cfg)): bitsandbytes quantizes as it loads.")
        model = quantized_base(model)
    if cfg.finetuning_type == "full":
        model.requires_grad_(True)
    elif cfg.finetuning_type == "freeze":
        apply_freeze(model, cfg)
    elif cfg.adapter_paths:
        model = _continue_adapters(model, cfg)
    else:
        model = get_peft_model(model, adapter_config(model, cfg))
    if half_frozen_base(cfg, stored_half(model)):
        settle_dtypes(model, computes_in_fp32(cfg))
    trainable, total = count_parameters(model)
    if distributed.is_main():  # every rank holds the same model: one line, not one per rank
        log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
                 100 * trainable / total)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its unpacked size."""
    def size(param: torch.nn.Parameter) -> int:
        state = getattr(param, "quant_state", None)
        return state.shape.numel() if state is not None else param.numel()

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total


def learning_rate_of(name: str, cfg: RunConfig) -> float:
    """The learning rate of one trainable parameter. LoRA+ trains B matrices loraplus_lr_ratio times
    faster than A (B starts at zero and must move far; A is random and need not), and LoRA on
    embedding layers at its own, usually much smaller, rate."""
    if cfg.loraplus_lr_ratio is None:
        return cfg.learning_rate
    if "lora_embedding_" in name:
        return cfg.loraplus_lr_embedding
    if "lora_B" in name:
        return cfg.learning_rate * cfg.loraplus_lr_ratio
    return cfg.learning_rate


# --- what a method needs from the loop ------------------------------------------------------------

class TrainingHooks:
    """What a method needs from the training loop beyond forward and backward. Most need nothing."""

    def before_step(self) -> None:
        """After the accumulation window's backward passes, before clipping."""

    def after_step(self, step: int) -> None:
        """After optimizer.step(), while the gradients are still there."""

    def save(self, model: torch.nn.Module, folder: Path, final: bool,
             state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the model or adapter, an adapter with the record of its base; `final` for the
        run's output, not a checkpoint; `state_dict`: the whole weights when the model's own are
        sharded over ranks."""
        # A grown vocabulary trains the embeddings and head as modules_to_save, which hold them
        # whole; peft's default would also store the base's own (resized) copies beside them.
        extra = {"save_embedding_layers": False} if isinstance(model, PeftModel) else {}
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict, **extra)
        record_base(model, folder)


class AdaLoraHooks(TrainingHooks):
    """AdaLoRA shrinks ranks from importance scores updated every step, and keeps its P and Q
    factors near-orthogonal with a penalty that peft adds only to a loss computed from labels
    inside its own forward, which the stages bypass."""

    def __init__(self, model: PeftModel, total_steps: int):
        adalora = model.base_model
        config = adalora.peft_config[adalora.trainable_adapter_name]
        if config.tinit >= total_steps - config.tfinal:
            raise ConfigError(f"adalora_tinit: {config.tinit} plus adalora_tfinal: {config.tfinal} "
                              f"leave no step of this {total_steps}-step run to reallocate ranks.",
                              "lower adalora_tinit / adalora_tfinal or train for more steps.")
        adalora.rankallocator.set_total_step(total_steps)
        self.model, self.adapter, self.weight = model, adalora.trainable_adapter_name, config.orth_reg_weight

    def orthogonality_penalty(self) -> torch.Tensor:
        """Mean over A and B matrices of ||P P^T - I||_F (rows of A, columns of B)."""
        penalties = []
        for name, param in self.model.named_parameters():
            if param.requires_grad and f"lora_A.{self.adapter}" in name:
                gram = param @ param.T
            elif param.requires_grad and f"lora_B.{self.adapter}" in name:
                gram = param.T @ param
            else:
                continue
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            penalties.append(torch.linalg.matrix_norm(gram - eye))
        return torch.stack(penalties).mean()

    def before_step(self) -> None:
        if self.weight > 0:
            (self.weight * self.orthogonality_penalty()).backward()

    def after_step(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)


class PissaHooks(TrainingHooks):
    """A PiSSA adapter is relative to a base whose top singular directions were moved into it. The
    run's output is converted to a plain LoRA adapter (rank 2r: the trained factors minus the
    initial ones) on the unchanged base, so chat, export and other tools load it like any LoRA.
    Checkpoints keep the unconverted adapter, which is what resuming needs."""

    def __init__(self, model: PeftModel, output_dir: Path):
        # peft loads it back as an adapter named after the folder, so the name must be a valid one.
        self.initial = output_dir / "pissa_init"
        model.save_pretrained(self.initial, safe_serialization=True)

    def save(self, model: torch.nn.Module, folder: Path, final: bool,
             state_dict: dict[str, torch.Tensor] | None = None) -> None:
        if not final:
            super().save(model, folder, final, state_dict)
            return
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict,
                              path_initial_model_for_weight_conversion=str(self.initial))
        record_base(model, folder)
        shutil.rmtree(self.initial)


def training_hooks(model: torch.nn.Module, total_steps: int, output_dir: Path) -> TrainingHooks:
    """The hooks the model's method needs, for a run of `total_steps` optimizer steps."""
    if isinstance(model, PeftModel):
        config = model.active_peft_config
        if config.peft_type == "ADALORA":
            return AdaLoraHooks(model, total_steps)
        if str(getattr(config, "init_lora_weights", "")).startswith("pissa"):
            return PissaHooks(model, output_dir)
    return TrainingHooks()
