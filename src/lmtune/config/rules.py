"""Combination rules: keys that cannot work together, or would be silently ignored, are refused
with the fix. They run after field-level validation (schema.py), before any model or data loads.
"""

from __future__ import annotations

from lmtune.config.schema import RunConfig
from lmtune.errors import ConfigError

ADAPTER_METHODS = ("lora", "oft", "adalora", "ia3", "prefix", "prompt", "ptuning")
# Adapter methods whose frozen base may be stored in half precision (models/precision.py).
HALF_BASE_METHODS = ("lora", "adalora", "ia3", "prefix", "prompt", "ptuning")

# Each method key and the finetuning_types it applies to (the first is the one a fix suggests). A key
# set for another method would be silently ignored, so it is refused instead.
_METHOD_KEYS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("lora_target", "lora_alpha", "lora_dropout"), ("lora", "adalora")),
    **dict.fromkeys(("lora_rank", "use_rslora", "use_dora", "pissa_init", "pissa_iter",
                     "loraplus_lr_ratio", "loraplus_lr_embedding"), ("lora",)),
    "additional_target": ("lora", "oft", "adalora", "ia3"),
    **dict.fromkeys(("oft_target", "oft_block_size", "oft_rank", "module_dropout"), ("oft",)),
    **dict.fromkeys(("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
                     "use_llama_pro"), ("freeze",)),
    **dict.fromkeys(("adalora_init_r", "adalora_target_r", "adalora_tinit", "adalora_tfinal",
                     "adalora_deltaT", "adalora_orth_reg_weight"), ("adalora",)),
    "ia3_target": ("ia3",),
    "num_virtual_tokens": ("prefix", "prompt", "ptuning"),
    **dict.fromkeys(("prompt_tuning_init", "prompt_tuning_init_text"), ("prompt",)),
    "prefix_projection": ("prefix",),
    "encoder_hidden_size": ("ptuning", "prefix"),
    "encoder_reparameterization_type": ("ptuning",),
    # Quantized weights cannot be trained, so a quantized base needs an adapter method.
    **dict.fromkeys(("adapter_name_or_path", "create_new_adapter", "quantization_bit"), ADAPTER_METHODS),
}


def keys_for_other_methods(finetuning_type: str) -> set[str]:
    """Method keys that do not apply to `finetuning_type` (compare leaves them out of a shared base
    for a variant that switches method)."""
    return {k for k, methods in _METHOD_KEYS.items() if finetuning_type not in methods}


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check_method_keys(cfg: RunConfig, explicitly_set: set[str]) -> None:
    stray = [k for k, methods in _METHOD_KEYS.items()
             if k in explicitly_set and cfg.finetuning_type not in methods]
    if not stray:
        return
    home = _METHOD_KEYS[stray[0]][0]
    keys = sorted(k for k in stray if _METHOD_KEYS[k][0] == home)
    shared = [m for m in _METHOD_KEYS[keys[0]] if all(m in _METHOD_KEYS[k] for k in keys)]
    raise ConfigError(f"{', '.join(keys)} belong{'s' if len(keys) == 1 else ''} to finetuning_type: "
                      f"{_or(shared)}, but finetuning_type is {cfg.finetuning_type}.",
                      f"remove {', '.join(keys)} or set finetuning_type: {home}.")


def _needs(cfg_holds: bool, key: str, needed: str, explicitly_set: set[str]) -> None:
    """Refuse `key` set explicitly where it would be ignored because `needed` does not hold."""
    if key in explicitly_set and not cfg_holds:
        raise ConfigError(f"{key} applies only with {needed}, so it would be ignored here.",
                          f"set {needed} or remove {key}.")


def _check_half_base(cfg: RunConfig) -> None:
    """frozen_dtype: bfloat16 is asked for explicitly (auto chooses for itself): refuse it where
    the base cannot be stored so, rather than ignore it."""
    where = None
    if cfg.finetuning_type not in HALF_BASE_METHODS:
        where = f"finetuning_type: {cfg.finetuning_type} (it applies to {_or(list(HALF_BASE_METHODS))})"
    elif cfg.quantization_bit is not None:
        where = "quantization_bit (bitsandbytes stores the base)"
    elif cfg.fsdp or cfg.fsdp_config or cfg.deepspeed:
        where = "fsdp or deepspeed (one process or DDP only; with bf16: true, auto stores it in bf16)"
    if where:
        raise ConfigError(f"frozen_dtype: bfloat16 cannot apply with {where}.",
                          "remove frozen_dtype.")


def _check_method_combinations(cfg: RunConfig, explicitly_set: set[str]) -> None:
    _needs(cfg.pissa_init, "pissa_iter", "pissa_init: true", explicitly_set)
    _needs(cfg.loraplus_lr_ratio is not None, "loraplus_lr_embedding", "loraplus_lr_ratio",
           explicitly_set)
    _needs(cfg.prefix_projection or cfg.finetuning_type != "prefix", "encoder_hidden_size",
           "prefix_projection: true", explicitly_set)
    _needs(cfg.prompt_tuning_init == "text", "prompt_tuning_init_text", "prompt_tuning_init: text",
           explicitly_set)
    _needs(bool(cfg.adapter_paths), "create_new_adapter", "adapter_name_or_path", explicitly_set)
    if cfg.frozen_dtype == "bfloat16":
        _check_half_base(cfg)
    _needs(cfg.quantization_bit is not None, "quantization_method", "quantization_bit", explicitly_set)
    for key in ("quantization_type", "double_quantization"):
        _needs(cfg.quantization_bit == 4, key, "quantization_bit: 4", explicitly_set)
    if cfg.pissa_iter == 0:
        raise ConfigError("pissa_iter: 0 would run no SVD iteration.",
                          "use a positive count (16 is a good default) or -1 for the exact SVD.")
    if cfg.prompt_tuning_init == "text" and not cfg.prompt_tuning_init_text:
        raise ConfigError("prompt_tuning_init: text needs the text in prompt_tuning_init_text.",
                          "add e.g. prompt_tuning_init_text: 'You are a helpful assistant.'")
    if cfg.pissa_init and cfg.use_dora:
        raise ConfigError("pissa_init and use_dora are both set: the PiSSA adapter is saved "
                          "converted to plain LoRA, which cannot carry DoRA's magnitudes.",
                          "keep one of them.")
    if cfg.pissa_init and cfg.quantization_bit:
        raise ConfigError("pissa_init with quantization_bit: PiSSA factors the full-precision "
                          "weights and leaves a residual base, which quantization would round.",
                          "remove quantization_bit (or pissa_init).")
    if cfg.pissa_init and cfg.adapter_paths and not cfg.create_new_adapter:
        raise ConfigError("pissa_init starts a new adapter, but training continues on the last "
                          "adapter of adapter_name_or_path.",
                          "set create_new_adapter: true to merge it and start a PiSSA adapter, or "
                          "remove pissa_init.")
    if cfg.finetuning_type == "oft" and (cfg.oft_rank > 0) == (cfg.oft_block_size > 0):
        given = f"oft_rank: {cfg.oft_rank} and oft_block_size: {cfg.oft_block_size}"
        raise ConfigError(f"{given}: OFT's blocks are set by exactly one of them (the number of "
                          "blocks, or their size), the other 0.",
                          "e.g. oft_block_size: 32 (and oft_rank: 0), or oft_rank: 8 and "
                          "oft_block_size: 0.")
    if cfg.adalora_target_r > cfg.adalora_init_r:
        raise ConfigError(f"adalora_target_r: {cfg.adalora_target_r} is above adalora_init_r: "
                          f"{cfg.adalora_init_r}; AdaLoRA only removes rank.",
                          "set adalora_target_r at or below adalora_init_r.")
    if cfg.finetuning_type == "adalora" and cfg.resume_from_checkpoint:
        raise ConfigError("finetuning_type: adalora cannot resume: its importance scores and rank "
                          "budget are not in checkpoints, so a resumed run would differ.",
                          "start the run again without resume_from_checkpoint.")


# Stage keys and the stages they apply to; a key set for another stage would be ignored, so it is
# refused.
_STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "ref_model": ("dpo", "kto", "ppo"),
    "pref_beta": ("dpo", "kto"),  # ppo weighs its KL with ppo_kl_coef
    **dict.fromkeys(("pref_loss", "pref_ftx", "dpo_label_smoothing", "simpo_gamma"), ("dpo",)),
    **dict.fromkeys(("kto_chosen_weight", "kto_rejected_weight"), ("kto",)),
    **dict.fromkeys(("reward_model", "ppo_epochs", "ppo_buffer_size", "ppo_target", "ppo_kl_coef",
                     "ppo_score_norm", "ppo_whiten_rewards", "ppo_clip_range", "ppo_vf_coef"),
                    ("ppo",)),
}


def _check_stage_keys(cfg: RunConfig, explicitly_set: set[str]) -> None:
    stray = sorted(k for k, stages in _STAGE_KEYS.items()
                   if k in explicitly_set and cfg.stage not in stages)
    if stray:
        stages = _or(list(_STAGE_KEYS[stray[0]]))
        raise ConfigError(f"{', '.join(stray)} appl{'ies' if len(stray) == 1 else 'y'} to stage "
                          f"{stages}, but stage is {cfg.stage}, so {'it' if len(stray) == 1 else 'they'}"
                          " would be ignored.", f"remove {', '.join(stray)} or change stage.")
    if cfg.stage == "rm" and cfg.finetuning_type not in ("full", "freeze", "lora"):
        raise ConfigError(f"stage rm trains a scalar head on the decoder's last hidden state; "
                          f"finetuning_type: {cfg.finetuning_type} is not supported there.",
                          "use finetuning_type: lora, full or freeze.")
    if cfg.stage == "rm" and (cfg.pissa_init or cfg.finetuning_type == "adalora"):
        raise ConfigError("stage rm saves its adapter beside the scalar head as plain LoRA; "
                          "pissa_init would need converting it.", "remove pissa_init.")
    if cfg.stage == "ppo" and cfg.finetuning_type in ("prefix", "prompt", "ptuning", "adalora"):
        raise ConfigError(f"stage ppo with finetuning_type: {cfg.finetuning_type} is not supported: "
                          "the value head reads the policy's hidden states token by token.",
                          "use finetuning_type: lora (or full / freeze with enough memory).")
    if cfg.stage == "ppo" and not cfg.reward_model:
        raise ConfigError("stage ppo needs reward_model: the output_dir of a stage rm run, or a "
                          "Python function 'module:function'.",
                          "train one with stage: rm first, then set reward_model: saves/my-rm.")
    if cfg.ref_model and cfg.stage == "dpo" and cfg.pref_loss in ("orpo", "simpo"):
        raise ConfigError(f"ref_model is set, but pref_loss {cfg.pref_loss} uses no reference model.",
                          "remove ref_model, or use pref_loss sigmoid, ipo or hinge.")


def _check_data_combinations(cfg: RunConfig) -> None:
    if cfg.train_on_prompt and cfg.mask_history:
        raise ConfigError("train_on_prompt and mask_history are both set: one trains on every token, "
                          "the other only on the last reply.", "keep one of them.")
    if (cfg.train_on_prompt or cfg.mask_history) and cfg.stage != "sft":
        key = "train_on_prompt" if cfg.train_on_prompt else "mask_history"
        raise ConfigError(f"{key} applies to stage sft only (this is stage {cfg.stage}).",
                          f"remove {key}.")
    if cfg.neat_packing and cfg.packing is False:
        raise ConfigError("neat_packing: true asks for packing, but packing is false.",
                          "remove one of them.")
    if cfg.packing_enabled and cfg.stage not in ("sft", "pt"):
        raise ConfigError(f"packing applies to stages sft and pt (this is stage {cfg.stage}).",
                          "set packing: false.")
    if cfg.packing_enabled and cfg.finetuning_type in ("prefix", "prompt", "ptuning"):
        raise ConfigError(f"packing with finetuning_type: {cfg.finetuning_type}: its virtual tokens "
                          "would be shared by all samples of a row.", "set packing: false.")
    if cfg.interleave_probs is not None:
        if cfg.mix_strategy == "concat":
            raise ConfigError("interleave_probs is set, but mix_strategy is concat, which ignores it.",
                              "set mix_strategy: interleave_under or interleave_over.")
        try:
            probs = cfg.interleave_prob_list or []
        except ValueError:
            raise ConfigError(f"interleave_probs: '{cfg.interleave_probs}' is not a comma list of "
                              "numbers.", "write e.g. interleave_probs: 0.7,0.3.") from None
        if len(probs) != len(cfg.dataset_names):
            raise ConfigError(f"interleave_probs has {len(probs)} values for "
                              f"{len(cfg.dataset_names)} datasets.", "give one probability per dataset.")
        if any(not 0 < p <= 1 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise ConfigError(f"interleave_probs {cfg.interleave_probs} must be positive and sum to 1.",
                              "write e.g. interleave_probs: 0.7,0.3.")


def _check_predict_and_replay(cfg: RunConfig, explicitly_set: set[str]) -> None:
    if cfg.do_predict and "predict_with_generate" in explicitly_set and not cfg.predict_with_generate:
        raise ConfigError("do_predict with predict_with_generate: false: lmtune predicts by "
                          "generating answers (a loss alone is what eval_strategy gives).",
                          "set predict_with_generate: true (or remove it).")
    if cfg.do_predict and cfg.stage != "sft":
        raise ConfigError(f"do_predict generates answers after an sft run; stage {cfg.stage} "
                          "trains something else.", "remove do_predict, or predict with "
                          "`lmtune predict` on a config of stage sft.")
    _needs(max(cfg.num_beams, cfg.eval_num_beams or 1) > 1, "length_penalty", "num_beams > 1",
           explicitly_set)
    _needs(cfg.save_strategy == "steps", "save_steps", "save_strategy: steps", explicitly_set)
    _needs(cfg.gradient_checkpointing, "checkpoint_every_n_layers", "gradient_checkpointing: true",
           explicitly_set)
    _needs(cfg.stage in ("sft", "pt", "rm", "dpo"), "group_by_length", "stage: sft, pt, rm or dpo",
           explicitly_set)
    _check_best_model(cfg, explicitly_set)
    if cfg.train_from_scratch and cfg.finetuning_type != "full":
        raise ConfigError(f"train_from_scratch with finetuning_type: {cfg.finetuning_type}: most "
                          "weights would stay at their random start.", "set finetuning_type: full.")
    if cfg.compute_accuracy and cfg.stage != "sft":
        raise ConfigError(f"compute_accuracy scores the reply tokens of stage sft; stage {cfg.stage} "
                          "logs its own metrics.", "remove compute_accuracy.")
    if cfg.eval_generate_samples and cfg.stage != "sft":
        raise ConfigError(f"eval_generate_samples answers val prompts of an sft run; stage "
                          f"{cfg.stage} has no replies to compare with.", "remove eval_generate_samples.")
    if cfg.eval_generate_samples and cfg.eval_strategy == "no":
        raise ConfigError("eval_generate_samples is set, but eval_strategy is no, so no evaluation "
                          "runs.", "set eval_strategy: steps (or epoch) with val_size or eval_dataset.")
    if cfg.replay is None:
        return
    if isinstance(cfg.replay, int) and cfg.replay < 1:
        raise ConfigError(f"replay: {cfg.replay} asks for no general prompts.",
                          "set a count such as replay: 60, a prompts file, or remove replay.")
    if cfg.stage != "sft":
        raise ConfigError(f"replay adds the base model's own answers as sft conversations; stage "
                          f"{cfg.stage} does not train on those.", "remove replay or use stage: sft.")


# optim values lmtune builds (train/optim.py), and HF Trainer's other names with the reason.
BITSANDBYTES_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
              *BITSANDBYTES_OPTIMIZERS)
_OPTIMIZERS_ELSEWHERE = {
    "adamw_torch_xla": "it runs on TPUs (torch_xla)",
    "adamw_torch_npu_fused": "it runs on Ascend NPUs",
    "adamw_apex_fused": "it needs NVIDIA apex and a CUDA GPU",
    "adamw_anyprecision": "it needs torchdistx, which has no build for this torch",
}


# optim -> the GaLore optimizer that takes its place (LLaMA-Factory's pairing).
GALORE_OPTIMIZERS = {"adamw_torch": "GaLoreAdamW", "adamw_8bit": "GaLoreAdamW8bit",
                     "adamw_bnb_8bit": "GaLoreAdamW8bit", "paged_adamw_8bit": "GaLoreAdamW8bit",
                     "adafactor": "GaLoreAdafactor"}


def _check_projected_optimizer(cfg: RunConfig, explicitly_set: set[str]) -> None:
    """GaLore, APOLLO and BAdam: optimizers that change which part of each weight's gradient (or
    which weights) the state covers."""
    chosen = [key for key in ("use_galore", "use_apollo", "use_badam", "use_muon", "use_adam_mini")
              if getattr(cfg, key)]
    ours = [key for key in chosen if key in ("use_galore", "use_apollo", "use_badam")]
    for name in ("galore", "apollo"):
        if getattr(cfg, f"{name}_layerwise"):
            _check_layerwise(cfg, name)
    if not ours:
        return
    key = ours[0]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} are all set; a run has one optimizer.",
                          "keep one of them.")
    if cfg.use_badam:
        if cfg.finetuning_type != "full":
            raise ConfigError(f"use_badam with finetuning_type: {cfg.finetuning_type}: BAdam trains "
                              "the model's own layers, one at a time.",
                              "use finetuning_type: full, or remove use_badam.")
    elif cfg.finetuning_type not in ("full", "freeze"):
        raise ConfigError(f"{key} with finetuning_type: {cfg.finetuning_type}: it projects the "
                          "gradients of the model's own linear weights, which an adapter method "
                          "freezes (and LoRA is low-rank already).",
                          f"use finetuning_type: full or freeze, or remove {key}.")
    if cfg.use_galore and cfg.optim not in GALORE_OPTIMIZERS:
        raise ConfigError(f"use_galore with optim: {cfg.optim}: GaLore comes as AdamW, 8-bit AdamW "
                          "and Adafactor only.", f"use optim: {', '.join(GALORE_OPTIMIZERS)}.")
    if cfg.use_apollo and "optim" in explicitly_set and cfg.optim != "adamw_torch":
        raise ConfigError(f"use_apollo with optim: {cfg.optim}: APOLLO is an AdamW of its own.",
                          "remove optim (or set adamw_torch).")
    if cfg.fsdp:
        why = ("BAdam runs in one process" if cfg.use_badam else "the projection is computed "
               "from each weight's whole gradient (an SVD), which FSDP2 shards across ranks")
        raise ConfigError(f"{key} with fsdp: {why}.", f"remove fsdp, or remove {key}.")


def _check_layerwise(cfg: RunConfig, name: str) -> None:
    """Layer-wise GaLore / APOLLO step each weight inside the backward pass: one backward per
    update, in one process, with nothing left for a loss scaler to unscale."""
    key = f"{name}_layerwise"
    if not getattr(cfg, f"use_{name}"):
        raise ConfigError(f"{key} is a mode of {dict(galore='GaLore', apollo='APOLLO')[name]}, "
                          f"and use_{name} is not set.", f"set use_{name}: true, or remove {key}.")
    if cfg.gradient_accumulation_steps != 1:
        raise ConfigError(f"{key} with gradient_accumulation_steps: "
                          f"{cfg.gradient_accumulation_steps}: each weight is updated the moment "
                          "its gradient is complete, so there is no gradient left to accumulate.",
                          "set gradient_accumulation_steps: 1 (a larger per_device_train_batch_size "
                          f"keeps the batch), or remove {key}.")
    if cfg.stage == "ppo":
        raise ConfigError(f"{key} with stage ppo: a ppo update accumulates the gradients of several "
                          "minibatches.", f"remove {key}.")
    if cfg.fp16:
        raise ConfigError(f"{key} with fp16: the loss scaler unscales gradients at the optimizer "
                          "step, after layer-wise updates have used them.",
                          f"use bf16 or pure_bf16, or remove {key}.")


def _check_optimizer(cfg: RunConfig, explicitly_set: set[str]) -> None:
    if cfg.optim not in OPTIMIZERS:
        reason = _OPTIMIZERS_ELSEWHERE.get(cfg.optim, "lmtune does not include it")
        raise ConfigError(f"optim: {cfg.optim} is not available here: {reason}.",
                          f"use one of: {', '.join(OPTIMIZERS)} (or use_muon: true).")
    if cfg.use_muon and cfg.use_adam_mini:
        raise ConfigError("use_muon and use_adam_mini are both set; a run has one optimizer.",
                          "keep one of them.")
    if cfg.use_adam_mini and "optim" in explicitly_set:
        raise ConfigError(f"use_adam_mini and optim: {cfg.optim} are both set; a run has one "
                          "optimizer.", "keep one of them.")
    if cfg.use_adam_mini and cfg.finetuning_type not in ("full", "freeze"):
        raise ConfigError(f"use_adam_mini with finetuning_type: {cfg.finetuning_type}: Adam-mini "
                          "shares learning rates over blocks of the model's own weights (heads, "
                          "neurons, tokens), which adapter matrices do not have.",
                          "use finetuning_type: full or freeze, or remove use_adam_mini.")
    _check_projected_optimizer(cfg, explicitly_set)
    if cfg.use_muon and "optim" in explicitly_set:
        raise ConfigError(f"use_muon and optim: {cfg.optim} are both set; Muon brings its own AdamW "
                          "for the parameters that are not hidden matrices.", "keep one of them.")
    if cfg.use_muon and cfg.loraplus_lr_ratio is not None:
        raise ConfigError("use_muon with loraplus_lr_ratio: LoRA+ is a learning-rate rule for "
                          "AdamW on LoRA's factors.", "keep one of them.")
    if cfg.pure_bf16:
        if cfg.fp16:
            raise ConfigError("pure_bf16 and fp16 are both set.", "keep pure_bf16 (bfloat16 weights) "
                              "or fp16 (mixed precision on a GPU).")
        if cfg.quantization_bit is not None:
            raise ConfigError(f"pure_bf16 with quantization_bit: {cfg.quantization_bit}: the frozen "
                              "base is quantized already and its adapter trains in fp32.",
                              "remove pure_bf16, or quantization_bit to train in bf16.")


def _check_losses(cfg: RunConfig, explicitly_set: set[str]) -> None:
    chosen = [k for k in ("use_dft_loss", "use_eaft_loss", "use_asft_loss") if getattr(cfg, k)]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} are all token-loss rules; one run uses one.",
                          f"keep one of {', '.join(chosen)}.")
    if chosen and cfg.stage != "sft":
        raise ConfigError(f"{chosen[0]} reweights the token loss of stage sft; this is stage "
                          f"{cfg.stage}.", f"remove {chosen[0]}.")
    if cfg.use_asft_loss and cfg.finetuning_type in ("prefix", "prompt", "ptuning"):
        raise ConfigError(f"use_asft_loss with finetuning_type: {cfg.finetuning_type}: its reference "
                          "is the model without the adapter, and virtual tokens cannot be switched "
                          "off inside a forward.", "use finetuning_type lora, oft, full or freeze.")
    _needs(cfg.use_eaft_loss, "eaft_alpha", "use_eaft_loss: true", explicitly_set)
    _needs(cfg.use_asft_loss, "asft_alpha", "use_asft_loss: true", explicitly_set)
    if cfg.neftune_noise_alpha is not None and cfg.finetuning_type in ("prefix", "prompt", "ptuning"):
        raise ConfigError(f"neftune_noise_alpha with finetuning_type: {cfg.finetuning_type}: the "
                          "virtual tokens do not pass through the input embedding it adds noise to.",
                          "remove neftune_noise_alpha or use another finetuning_type.")


_GPU_KERNELS = "whose kernels run on CUDA GPUs only and are not included"
_QUANTIZATION_REFUSED = {
    "gptq": f"GPTQ models need the gptqmodel/optimum kernels, {_GPU_KERNELS}",
    "awq": f"AWQ models need the autoawq kernels, {_GPU_KERNELS}",
    "aqlm": f"AQLM models need the aqlm kernels, {_GPU_KERNELS}",
    "eetq": "EETQ's int8 kernels run on CUDA GPUs only and are not included",
    "hqq": "HQQ on-the-fly quantization is not included",
    "quanto": "quanto quantization is not included",
    "mxfp4": "MXFP4 weights need Hopper-class GPUs and are not included",
    "fp8": "FP8 weights need FP8 tensor cores (Hopper GPUs or newer) and are not included",
}


def _check_best_model(cfg: RunConfig, explicitly_set: set[str]) -> None:
    picks = cfg.load_best_model_at_end or cfg.early_stopping_steps is not None
    for key in ("metric_for_best_model", "greater_is_better"):
        _needs(picks, key, "load_best_model_at_end: true or early_stopping_steps", explicitly_set)
    if not picks:
        return
    key = "load_best_model_at_end" if cfg.load_best_model_at_end else "early_stopping_steps"
    if cfg.eval_strategy == "no":
        raise ConfigError(f"{key} compares evaluations, but eval_strategy is no.",
                          "set eval_strategy: steps (or epoch) with val_size or eval_dataset.")
    if cfg.stage == "ppo":
        raise ConfigError(f"{key} applies to the stages trained on a val split; ppo scores "
                          "held-out prompts by reward.", f"remove {key}.")
    if cfg.load_best_model_at_end and (cfg.fsdp or cfg.deepspeed):
        raise ConfigError("load_best_model_at_end keeps a copy of the trained weights, which fsdp "
                          "and deepspeed spread over the processes.",
                          "remove load_best_model_at_end and pick a checkpoint-N by its eval_loss "
                          "in trainer_log.jsonl.")


def _check_scheduler(cfg: RunConfig) -> None:
    name, kwargs = cfg.lr_scheduler_type, cfg.lr_scheduler_kwargs
    if name in ("reduce_lr_on_plateau", "greedy"):
        raise ConfigError(f"lr_scheduler_type: {name} changes the learning rate from a metric it "
                          "is fed each step; lmtune's schedules follow the step count.",
                          "use cosine_with_min_lr or warmup_stable_decay for a schedule that "
                          "ends low, or linear / cosine.")
    if name == "constant" and kwargs:
        raise ConfigError("lr_scheduler_kwargs is set, but lr_scheduler_type constant takes no "
                          "arguments, so it would be ignored.", "remove lr_scheduler_kwargs.")
    if kwargs is None and name in ("linear", "cosine", "constant", "constant_with_warmup"):
        return
    # Built once on a throwaway optimizer: wrong or missing arguments surface now, not after the
    # model and data have loaded.
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10,
                      scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as exc:
        given = f"lr_scheduler_kwargs {kwargs}" if kwargs else "no lr_scheduler_kwargs"
        raise ConfigError(f"lr_scheduler_type {name} with {given}: {str(exc).splitlines()[0]}",
                          "give the arguments of that schedule in transformers' get_scheduler, "
                          "e.g. {min_lr_rate: 0.1} for cosine_with_min_lr.") from None


def _check_export_keys(cfg: RunConfig, explicitly_set: set[str]) -> None:
    if cfg.export_gguf_type != "auto" and cfg.export_format != "gguf":
        raise ConfigError(f"export_gguf_type: {cfg.export_gguf_type} applies to export_format: gguf, "
                          f"but export_format is {cfg.export_format}.",
                          "add export_format: gguf, or remove export_gguf_type (infer_dtype sets the "
                          "dtype of an hf export).")
    if cfg.export_gguf_type != "auto" and "infer_dtype" in explicitly_set and cfg.infer_dtype != "auto":
        raise ConfigError(f"infer_dtype: {cfg.infer_dtype} and export_gguf_type: "
                          f"{cfg.export_gguf_type} both set the type of the GGUF's weights.",
                          "keep export_gguf_type (infer_dtype picks it only when it is auto).")


def _check_streaming(cfg: RunConfig) -> None:
    """What streaming (data/streaming.py) cannot serve, each refused with the reason."""
    if not cfg.streaming:
        if cfg.buffer_size != RunConfig.model_fields["buffer_size"].default:
            raise ConfigError(f"buffer_size: {cfg.buffer_size} is the shuffle buffer of streaming, "
                              "and streaming is off, so it would be ignored.",
                              "set streaming: true, or remove buffer_size.")
        return
    if cfg.max_steps <= 0:
        raise ConfigError("streaming: true needs max_steps: the number of rows, and so of steps per "
                          "epoch, is not known before the data has been read.",
                          "set max_steps (e.g. max_steps: 1000), or streaming: false.")
    if 0 < cfg.val_size < 1:
        raise ConfigError(f"streaming with val_size: {cfg.val_size}: a fraction of a total that is "
                          "not known up front.", "give val_size as a row count (e.g. val_size: 100: "
                          "the first 100 rows), or use eval_dataset.")
    if cfg.stage in ("dpo", "kto", "ppo"):
        why = {"dpo": "it scores every pair with the reference model before training",
               "kto": "it scores every answer with the reference model before training",
               "ppo": "its rollouts take their prompts in its own loop, not the shared one"}[cfg.stage]
        raise ConfigError(f"streaming applies to stages sft, pt and rm; stage {cfg.stage} is "
                          f"refused: {why}.", "set streaming: false.")
    if cfg.tokenized_path:
        raise ConfigError("streaming with tokenized_path: tokenized_path saves every encoded row, "
                          "which streaming never holds.", "remove tokenized_path, or set streaming: "
                          "false.")
    if cfg.replay is not None:
        raise ConfigError("streaming with replay: replay's answers are generated and encoded before "
                          "training.", "remove replay, or set streaming: false.")
    for key in ("save_strategy", "eval_strategy"):
        if getattr(cfg, key) == "epoch":
            raise ConfigError(f"streaming with {key}: epoch: the length of an epoch is not known "
                              "up front.", f"set {key}: steps.")


def check_combinations(cfg: RunConfig, explicitly_set: set[str]) -> None:
    """Refuse combinations that cannot work, with the fix. Runs after field-level validation."""
    _check_scheduler(cfg)
    if cfg.quantization_method != "bnb":
        raise ConfigError(f"quantization_method: {cfg.quantization_method} is refused: "
                          f"{_QUANTIZATION_REFUSED[cfg.quantization_method]}.",
                          "use quantization_method: bnb with quantization_bit: 4 or 8 on a "
                          "full-precision base (bitsandbytes runs on CPU and CUDA).")
    _check_predict_and_replay(cfg, explicitly_set)
    _check_export_keys(cfg, explicitly_set)
    if cfg.bf16 and cfg.fp16:
        raise ConfigError("bf16 and fp16 are both true.", "set only one of them (bf16 on CPUs and "
                          "recent GPUs).")
    _check_method_keys(cfg, explicitly_set)
    _check_method_combinations(cfg, explicitly_set)
    _check_stage_keys(cfg, explicitly_set)
    _check_optimizer(cfg, explicitly_set)
    _check_losses(cfg, explicitly_set)
    if cfg.warmup_ratio > 0 and cfg.warmup_steps > 0:
        raise ConfigError("warmup_ratio and warmup_steps are both set.", "keep only one of them.")
    if cfg.warmup_steps >= 1 and cfg.warmup_steps != int(cfg.warmup_steps):
        raise ConfigError(f"warmup_steps: {cfg.warmup_steps} is neither a whole number of steps "
                          "nor a fraction below 1.", "use e.g. warmup_steps: 20 or warmup_ratio: 0.1.")
    _check_data_combinations(cfg)
    _check_streaming(cfg)
    if cfg.infer_backend in ("sglang", "ktransformers"):
        raise ConfigError(f"infer_backend: {cfg.infer_backend} is a LLaMA-Factory backend lmtune does "
                          "not include (it would need its own server process and install).",
                          "use infer_backend: huggingface (the default) or vllm.")
    if cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size):
        raise ConfigError(f"val_size: {cfg.val_size} is neither a fraction below 1 nor a row count.",
                          "use e.g. val_size: 0.1 or val_size: 50.")
    if cfg.eval_dataset and cfg.val_size > 0:
        raise ConfigError("eval_dataset and val_size are both set: the val split comes from one "
                          "of them.", "keep eval_dataset (held-out files) or val_size (a split of "
                          "dataset).")
    if cfg.eval_on_each_dataset and not cfg.eval_dataset:
        raise ConfigError("eval_on_each_dataset scores each eval_dataset on its own, and no "
                          "eval_dataset is set (a val_size split is one set).",
                          "list the held-out datasets in eval_dataset, or remove eval_on_each_dataset.")
    if cfg.eval_strategy != "no" and cfg.val_size == 0 and not cfg.eval_dataset:
        raise ConfigError(f"eval_strategy: {cfg.eval_strategy} but val_size is 0 and no "
                          "eval_dataset is set, so there is nothing to evaluate on.",
                          "set val_size: 0.1 or eval_dataset (or eval_strategy: no).")
    if cfg.resume_from_checkpoint and cfg.overwrite_output_dir:
        raise ConfigError("resume_from_checkpoint and overwrite_output_dir are both set: "
                          "overwriting would delete the checkpoint to resume from.",
                          "keep resume_from_checkpoint, or set overwrite_output_dir: true alone to "
                          "start over.")


def check_training_inputs(cfg: RunConfig) -> None:
    """What `lmtune train` needs beyond a valid config (chat and export do not need these)."""
    if not cfg.dataset_names:
        raise ConfigError("lmtune train needs a dataset, and none is set.",
                          "add e.g. dataset: identity (a name in dataset_info.json) or a file path.")
    if not cfg.output_dir:
        raise ConfigError("lmtune train needs output_dir, and none is set.",
                          "add e.g. output_dir: saves/my-run.")


