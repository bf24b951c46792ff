"""The run configuration: one flat YAML namespace with LLaMA-Factory's key names, typed and checked.

`load_config(path, overrides)` reads the YAML, applies `key=value` overrides, and returns a validated
`RunConfig`. Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the key
and the fix, before any model or data is touched.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmtune.errors import ConfigError

# Keys users bring from LLaMA-Factory / HF TrainingArguments that only change behaviour on other
# hardware or launchers (multi-GPU, DeepSpeed, dataloader workers). They are accepted so that existing
# YAMLs run unchanged, and listed at start-up as not applied in this run.
ACCEPTED_NOT_APPLIED: dict[str, str] = {
    "ddp_timeout": "only matters for multi-process runs",
    "ddp_find_unused_parameters": "only matters for multi-process runs",
    "dataloader_num_workers": "batches come from pre-tokenised tensors in memory",
    "dataloader_pin_memory": "only matters on GPUs",
    "deepspeed": "only matters for multi-GPU runs launched with accelerate/torchrun",
    "fsdp": "only matters for multi-GPU runs launched with accelerate/torchrun",
    "fsdp_config": "only matters for multi-GPU runs launched with accelerate/torchrun",
    "save_only_model": "checkpoints always hold everything needed to resume",
    "flash_attn": "the attention kernel is chosen by transformers for the device",
    "low_cpu_mem_usage": "weights are always loaded directly",
    "use_fast_tokenizer": "the tokenizer's own fast implementation is always used",
    "ray_num_workers": "only matters for Ray launches",
    "disable_gradient_checkpointing": "gradient checkpointing is controlled by gradient_checkpointing",
    "include_num_input_tokens_seen": "tokens seen are always logged",
    "remove_unused_columns": "records are encoded by lmtune, never by column name",
    "hf_hub_token": "lmtune runs offline",
    "model_revision": "lmtune runs offline on local or cached models",
}


# LLaMA-Factory keys for features lmtune does not have. At their default (off) a YAML runs
# unchanged; any other value is refused with what to do instead, never silently ignored.
NOT_SUPPORTED: dict[str, tuple[Any, str]] = {
    "pref_bco_weight": (0.0, "the BCO term of dpo is not implemented; remove it (or set 0)."),
    "ld_alpha": (None, "LD-DPO's length weighting is not implemented; remove it."),
    "reward_model_type": ("lora", "lmtune tells a LoRA reward model from a full one by its folder; "
                          "'api' (a reward server) is not supported offline: use reward_model: "
                          "module:function to call your own code."),
    "reward_model_adapters": (None, "reward_model is the output_dir of a stage rm run, which holds "
                              "its adapter; remove reward_model_adapters."),
    "reward_model_quantization_bit": (None, "the reward model loads in full precision; remove it."),
    "ref_model_adapters": (None, "merge the adapters into a model with `lmtune export` and name "
                           "that folder as ref_model."),
    "ref_model_quantization_bit": (None, "the reference loads in full precision; remove it."),
}


class RunConfig(BaseModel):
    """Every key a YAML file may set. Each field's description is its one-line documentation."""

    # coerce_numbers_to_str: `output_dir=2024` on the command line arrives as an int.
    # allow_inf_nan=False: YAML reads `.inf`/`.nan` (and 1.0e+999) as floats; no key means anything
    # by them, and an infinite warmup_steps or val_size would crash int() in check_combinations.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    # --- model -------------------------------------------------------------------------------
    model_name_or_path: str = Field(
        "default",
        description="HF hub id, local HF folder, .gguf file, or 'default' (the built-in "
        "SmolLM2-135M-Instruct).")
    adapter_name_or_path: str | None = Field(
        None, description="Comma list of PEFT adapter folders; all but the last are merged, "
        "training continues on the last.")
    template: str | None = Field(
        None, description="Chat template name (LLaMA-Factory name) for a tokenizer without one: "
        "alpaca, chatml, llama2, llama3, mistral, qwen, gemma, deepseekcoder, default, empty. A "
        "tokenizer's own template always wins; a different name given for it is reported.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust its source.")

    # --- method ------------------------------------------------------------------------------
    stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto"] = Field(
        "sft", description="Training objective: pt (continued pre-training on plain text), sft "
        "(supervised fine-tuning), rm (reward model), ppo (RLHF against a reward), dpo (DPO and kin "
        "on preference pairs), kto (KTO on answers tagged desirable or not).")
    do_train: bool = Field(True, description="Train (true) or only load and check (false).")
    finetuning_type: Literal["full", "freeze", "lora", "adalora", "ia3", "prefix", "prompt",
                             "ptuning"] = Field(
        "lora", description="full: every weight; freeze: last layers or named modules; lora: "
        "low-rank adapters (DoRA, rsLoRA, PiSSA, LoRA+ by key); adalora: LoRA whose ranks shrink to "
        "a budget; ia3: learned scaling vectors; prefix: trained key/value prefixes in every layer; "
        "prompt: trained virtual input tokens; ptuning: virtual tokens made by a prompt encoder.")
    lora_target: str = Field(
        "all", description="lora, adalora: 'all' (every linear layer except the output head) or a "
        "comma list of module names, e.g. q_proj,v_proj.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r (adalora: adalora_init_r, adalora_target_r).")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA scale numerator; default 2 x lora_rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last n decoder layers (n > 0) or the first -n (n < 0).")
    freeze_trainable_modules: str = Field(
        "all", description="freeze: within the trainable layers, 'all' or a comma list of module "
        "names (e.g. mlp,self_attn).")
    freeze_extra_modules: str | None = Field(
        None, description="freeze: comma list of modules outside the decoder layers to train as "
        "well, e.g. embed_tokens,norm.")
    use_rslora: bool = Field(
        False, description="lora: scale by alpha/sqrt(r) instead of alpha/r (rsLoRA), so high ranks "
        "keep learning.")
    use_dora: bool = Field(
        False, description="lora: DoRA, a trained magnitude per output row on top of LoRA's "
        "direction update; steps take longer.")
    pissa_init: bool = Field(
        False, description="lora: start A and B from each weight's top singular vectors (PiSSA); "
        "the saved adapter is converted to plain LoRA (rank 2r) on the unchanged base.")
    pissa_iter: int = Field(
        16, ge=-1, description="lora with pissa_init: iterations of the fast randomised SVD; -1 = "
        "exact SVD (slow on large weights).")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="lora: LoRA+; B matrices learn at learning_rate x this (16 in the "
        "paper), A matrices at learning_rate.")
    loraplus_lr_embedding: float = Field(
        1e-6, gt=0, description="lora with loraplus_lr_ratio: learning rate of LoRA on embedding layers.")
    additional_target: str | None = Field(
        None, description="lora, adalora, ia3: comma list of modules trained in full and saved with "
        "the adapter (peft modules_to_save), by module name, e.g. embed_tokens or norm.")
    create_new_adapter: bool = Field(
        False, description="With adapter_name_or_path: merge every given adapter into the base and "
        "train a new adapter on top.")
    adalora_init_r: int = Field(12, ge=1, description="adalora: starting rank of every adapted matrix.")
    adalora_target_r: int = Field(8, ge=1, description="adalora: average rank the budget shrinks to.")
    adalora_tinit: int = Field(0, ge=0, description="adalora: steps before ranks start to shrink.")
    adalora_tfinal: int = Field(0, ge=0, description="adalora: last steps, trained with ranks fixed.")
    adalora_deltaT: int = Field(1, ge=1, description="adalora: steps between two rank re-allocations.")
    adalora_orth_reg_weight: float = Field(
        0.5, ge=0.0, description="adalora: weight of the penalty keeping A and B orthogonal.")
    ia3_target: str | None = Field(
        None, description="ia3: 'all' (every linear layer except the output head) or a comma list of "
        "module names; default peft's choice for the architecture (k_proj,v_proj,down_proj for Llama).")
    num_virtual_tokens: int = Field(
        20, ge=1, description="prefix, prompt, ptuning: number of trained virtual tokens.")
    prompt_tuning_init: Literal["random", "text"] = Field(
        "random", description="prompt: start the virtual tokens random, or from the embeddings of "
        "prompt_tuning_init_text.")
    prompt_tuning_init_text: str | None = Field(
        None, description="prompt with prompt_tuning_init: text: the text whose token embeddings "
        "start the virtual tokens (repeated to num_virtual_tokens).")
    prefix_projection: bool = Field(
        False, description="prefix: make the prefixes through a 2-layer MLP while training (Li & "
        "Liang's reparameterisation); the saved adapter holds the prefixes it produced.")
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="ptuning, prefix with prefix_projection: hidden width of the prompt "
        "encoder; default the model's hidden size.")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP", description="ptuning: the prompt encoder, an MLP or a bidirectional LSTM.")
    quantization_bit: Literal[4, 8] | None = Field(
        None, description="Load the frozen base in 4 or 8 bits (QLoRA with an adapter method); "
        "bitsandbytes runs on CPU and CUDA.")
    quantization_method: Literal["bnb"] = Field(
        "bnb", description="Quantization library: bnb (bitsandbytes).")
    quantization_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="quantization_bit 4: the 4-bit data type.")
    double_quantization: bool = Field(
        True, description="quantization_bit 4: quantize the per-block scales too (~0.4 bit per "
        "weight less).")

    # --- preference and RL stages -------------------------------------------------------------
    pref_beta: float = Field(
        0.1, gt=0.0, description="dpo, kto: strength of the implicit KL to the reference (beta); "
        "orpo: weight of the odds-ratio term; simpo: reward scale.")
    pref_loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO), ipo, hinge, orpo (odds ratio + SFT, no "
        "reference) or simpo (length-normalised, no reference).")
    pref_ftx: float = Field(
        0.0, ge=0.0, description="dpo: add this x the SFT loss of the chosen answer (keeps the model "
        "fluent while it learns the preference).")
    dpo_label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="dpo with pref_loss sigmoid: assumed share of pairs whose "
        "label is flipped (robust/conservative DPO).")
    simpo_gamma: float = Field(0.5, ge=0.0, description="dpo with pref_loss simpo: target reward margin.")
    kto_chosen_weight: float = Field(1.0, gt=0.0, description="kto: weight of desirable answers' loss.")
    kto_rejected_weight: float = Field(
        1.0, gt=0.0, description="kto: weight of undesirable answers' loss.")
    ref_model: str | None = Field(
        None, description="dpo, kto, ppo: the reference model (folder, .gguf or 'default'); default "
        "the policy as it is before its first update (ppo: with its adapter switched off).")
    reward_model: str | None = Field(
        None, description="ppo: an output_dir of stage rm, or a Python function 'module:function' "
        "called as f(prompts, responses) -> list of floats (verifiable rewards).")
    ppo_epochs: int = Field(4, ge=1, description="ppo: optimisation passes over each batch of rollouts.")
    ppo_buffer_size: int = Field(
        1, ge=1, description="ppo: rollout batches collected per iteration; each batch is "
        "per_device_train_batch_size x gradient_accumulation_steps prompts.")
    ppo_target: float | None = Field(
        6.0, gt=0.0, description="ppo: target KL to the reference per response for the adaptive KL "
        "coefficient; null keeps ppo_kl_coef fixed.")
    ppo_kl_coef: float = Field(0.2, ge=0.0, description="ppo: starting KL penalty coefficient.")
    ppo_score_norm: bool = Field(
        False, description="ppo: normalise scores by their running mean and std before the KL penalty.")
    ppo_whiten_rewards: bool = Field(
        False, description="ppo: whiten per-token rewards over each batch before advantages.")
    ppo_clip_range: float = Field(
        0.2, gt=0.0, description="ppo: how far the policy ratio may move per update (and values, "
        "around their rollout estimate).")
    ppo_vf_coef: float = Field(0.1, ge=0.0, description="ppo: weight of the value loss.")

    # --- data --------------------------------------------------------------------------------
    dataset: str | None = Field(
        None, description="Comma list of dataset names from dataset_info.json, or paths to data "
        "files (json, jsonl, csv, parquet, txt, arrow) or folders of them.")
    eval_dataset: str | None = Field(
        None, description="Comma list of datasets (names or paths) used whole as the val split, "
        "instead of splitting val_size rows off `dataset`.")
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json and dataset files.")
    data_vars: dict[str, str] = Field(
        default_factory=dict, description="Values for {{key}} placeholders in dataset text, e.g. "
        "{name: Orrin, author: Tallis Labs}.")
    cutoff_len: int = Field(2048, ge=2, description="Most tokens in one encoded row (prompt + response).")
    max_samples: int | None = Field(
        None, ge=1, description="Keep the first N records of EACH dataset (the report says what it "
        "dropped).")
    val_size: float = Field(
        0.0, ge=0.0, description="Validation split: a fraction in (0, 1) or a row count >= 1.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = Field(
        "concat", description="How datasets combine: concat (one after another), interleave_under "
        "(alternate until one runs out), interleave_over (until all ran out; small ones repeat).")
    interleave_probs: str | None = Field(
        None, description="Interleave: comma list of sampling probabilities, one per dataset, "
        "summing to 1 (default: strict alternation).")
    train_on_prompt: bool = Field(
        False, description="Train on prompt tokens too, not only on the assistant replies.")
    mask_history: bool = Field(
        False, description="Train only on the last assistant reply of each conversation.")
    cutoff_policy: Literal["truncate", "drop"] = Field(
        "truncate", description="Rows over cutoff_len: truncate (keeping at least one trained "
        "token, dropping older turns if needed) or drop. Both are counted.")
    skip_bad_records: bool = Field(
        False, description="Skip records that do not fit their format (counted in the report) "
        "instead of stopping with an error that lists them.")
    packing: bool | None = Field(
        None, description="Pack several rows into each cutoff_len row; samples never attend to "
        "each other and the loss is unchanged. Default: on for stage pt, off otherwise.")
    neat_packing: bool = Field(
        False, description="LLaMA-Factory's packing without cross-attention; the same as packing: "
        "true here, because lmtune's packing never lets samples attend to each other.")
    overwrite_cache: bool = Field(
        False, description="Encode the data afresh instead of reading encoded rows from the cache.")
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="Processes that encode the data in parallel (default one).")

    # --- output ------------------------------------------------------------------------------
    output_dir: str | None = Field(None, description="Where the run writes its model, logs and checkpoints.")
    overwrite_output_dir: bool = Field(
        False, description="Delete a non-empty output_dir before training.")
    logging_steps: int = Field(10, ge=1, description="Write a trainer_log.jsonl line every n steps.")
    save_steps: int = Field(500, ge=1, description="Write checkpoint-N every n optimizer steps.")
    save_total_limit: int | None = Field(
        None, ge=1, description="Keep only the newest n complete checkpoints (none = keep all).")
    plot_loss: bool = Field(True, description="Write training_loss.png at the end.")
    report_to: Literal["none"] | list[Literal["none"]] = Field(
        "none", description="Experiment trackers; lmtune logs to trainer_log.jsonl, so only 'none'.")

    # --- training ----------------------------------------------------------------------------
    per_device_train_batch_size: int = Field(1, ge=1, description="Rows per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW.")
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, description="Optimizer steps to run; overrides num_train_epochs when > 0.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warmup as a fraction of all steps.")
    warmup_steps: float = Field(
        0, ge=0, description="Warmup steps (a value < 1 is a fraction of all steps).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the gradient norm to this (0 = off).")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    bf16: bool = Field(False, description="bfloat16 mixed precision (weights stay fp32).")
    fp16: bool = Field(False, description="float16 mixed precision with loss scaling (GPU only).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower.")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="When to compute eval loss on the val split.")
    eval_steps: int | None = Field(None, ge=1, description="Eval every n steps; default logging_steps.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Rows per eval batch.")
    resume_from_checkpoint: str | None = Field(
        None, description="'auto' (newest complete checkpoint in output_dir) or a checkpoint path.")

    # --- generation (chat) -------------------------------------------------------------------
    do_sample: bool = Field(True, description="Sample in chat; --prompt answers greedily unless set.")
    temperature: float = Field(0.95, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(0.7, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Sample among the k most likely tokens (0 = all).")
    max_new_tokens: int = Field(512, ge=1, description="Most tokens generated per answer.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Penalty on repeated tokens (1 = off).")

    # --- export ------------------------------------------------------------------------------
    export_dir: str | None = Field(None, description="Where `lmtune export` writes the merged model.")
    export_size: int = Field(5, ge=1, description="Largest safetensors shard, in GB.")
    export_device: Literal["cpu", "auto"] = Field("cpu", description="Device used for merging.")
    export_legacy_format: Literal[False] = Field(
        False, description="Must stay false: exports are safetensors only.")
    export_full_precision: bool = Field(
        False, description="Merge into the base loaded in full precision even though training used "
        "a quantized one (quantization_bit) or the base checkpoint is quantized.")

    # Keys from ACCEPTED_NOT_APPLIED that the YAML set, kept to report them.
    not_applied: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            return [v.strip() for v in value.split(",")]
        return value

    # --- derived values ----------------------------------------------------------------------
    @property
    def dataset_names(self) -> list[str]:
        return split_list(self.dataset)

    @property
    def interleave_prob_list(self) -> list[float] | None:
        return [float(p) for p in split_list(self.interleave_probs)] if self.interleave_probs else None

    @property
    def packing_enabled(self) -> bool:
        if self.packing is not None:
            return self.packing
        return self.neat_packing or self.stage == "pt"

    @property
    def adapter_paths(self) -> list[str]:
        return split_list(self.adapter_name_or_path)

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def effective_eval_steps(self) -> int:
        return self.eval_steps or self.logging_steps

    @property
    def mixed_precision(self) -> Literal["no", "bf16", "fp16"]:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of `total_steps` optimizer steps."""
        if self.warmup_ratio > 0:
            return int(round(self.warmup_ratio * total_steps))
        if 0 < self.warmup_steps < 1:
            return int(round(self.warmup_steps * total_steps))
        return int(self.warmup_steps)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able values, saved next to every checkpoint."""
        return self.model_dump(mode="json")


def split_list(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


ADAPTER_METHODS = ("lora", "adalora", "ia3", "prefix", "prompt", "ptuning")

# Each method key and the finetuning_types it applies to (the first is the one a fix suggests). A key
# set for another method would be silently ignored, so it is refused instead.
_METHOD_KEYS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("lora_target", "lora_alpha", "lora_dropout"), ("lora", "adalora")),
    **dict.fromkeys(("lora_rank", "use_rslora", "use_dora", "pissa_init", "pissa_iter",
                     "loraplus_lr_ratio", "loraplus_lr_embedding"), ("lora",)),
    "additional_target": ("lora", "adalora", "ia3"),
    **dict.fromkeys(("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"),
                    ("freeze",)),
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


def _check_method_combinations(cfg: RunConfig, explicitly_set: set[str]) -> None:
    _needs(cfg.pissa_init, "pissa_iter", "pissa_init: true", explicitly_set)
    _needs(cfg.loraplus_lr_ratio is not None, "loraplus_lr_embedding", "loraplus_lr_ratio",
           explicitly_set)
    _needs(cfg.prefix_projection or cfg.finetuning_type != "prefix", "encoder_hidden_size",
           "prefix_projection: true", explicitly_set)
    _needs(cfg.prompt_tuning_init == "text", "prompt_tuning_init_text", "prompt_tuning_init: text",
           explicitly_set)
    _needs(bool(cfg.adapter_paths), "create_new_adapter", "adapter_name_or_path", explicitly_set)
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


def check_combinations(cfg: RunConfig, explicitly_set: set[str]) -> None:
    """Refuse combinations that cannot work, with the fix. Runs after field-level validation."""
    if cfg.bf16 and cfg.fp16:
        raise ConfigError("bf16 and fp16 are both true.", "set only one of them (bf16 on CPUs and "
                          "recent GPUs).")
    _check_method_keys(cfg, explicitly_set)
    _check_method_combinations(cfg, explicitly_set)
    _check_stage_keys(cfg, explicitly_set)
    if cfg.warmup_ratio > 0 and cfg.warmup_steps > 0:
        raise ConfigError("warmup_ratio and warmup_steps are both set.", "keep only one of them.")
    if cfg.warmup_steps >= 1 and cfg.warmup_steps != int(cfg.warmup_steps):
        raise ConfigError(f"warmup_steps: {cfg.warmup_steps} is neither a whole number of steps "
                          "nor a fraction below 1.", "use e.g. warmup_steps: 20 or warmup_ratio: 0.1.")
    _check_data_combinations(cfg)
    if cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size):
        raise ConfigError(f"val_size: {cfg.val_size} is neither a fraction below 1 nor a row count.",
                          "use e.g. val_size: 0.1 or val_size: 50.")
    if cfg.eval_dataset and cfg.val_size > 0:
        raise ConfigError("eval_dataset and val_size are both set: the val split comes from one "
                          "of them.", "keep eval_dataset (held-out files) or val_size (a split of "
                          "dataset).")
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


def _describe_type_error(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    return f"{key}: {err['msg'].lower()} (got {value!r})"


def _closest(key: Any, choices: list[str]) -> str | None:
    # str(): YAML keys may be numbers, booleans or null (`1: x`, `~: x`), which difflib cannot compare.
    match = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
    return match[0] if match else None


def known_keys() -> list[str]:
    return sorted(k for k in RunConfig.model_fields if k != "not_applied")


def build_config(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a flat dict of keys into a RunConfig. `source` names the file in messages."""
    values = dict(values)
    not_applied = {k: values.pop(k) for k in list(values) if k in ACCEPTED_NOT_APPLIED}
    off_only = {k: values.pop(k) for k in list(values) if k in NOT_SUPPORTED}
    valid = known_keys()
    unknown = [k for k in values if k not in valid]
    if unknown:
        key = unknown[0]
        guess = _closest(key, valid + list(ACCEPTED_NOT_APPLIED) + list(NOT_SUPPORTED))
        hint = f"did you mean '{guess}'?" if guess else "see `lmtune train --help` for every key."
        raise ConfigError(f"{source}: unknown key '{key}'.", hint)
    for key, value in off_only.items():
        default, fix = NOT_SUPPORTED[key]
        # reward_model_type 'full' is accepted too: the folder says what it holds.
        if value != default and not (key == "reward_model_type" and value == "full"):
            raise ConfigError(f"{source}: {key}: {value!r} is a LLaMA-Factory feature lmtune does "
                              "not have.", fix)
    try:
        cfg = RunConfig(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{source}: {_describe_type_error(first)}",
                          f"see `lmtune train --help` for the type of '{first['loc'][0]}'.") from None
    check_combinations(cfg, set(values))
    cfg.not_applied = not_applied
    return cfg


# PyYAML raises more than YAMLError on text it parses but cannot build a value from: ValueError for
# `2001-13-45`, `!!float abc` or an integer over Python's 4300-digit limit, AttributeError for
# `!!timestamp abc`, RecursionError for `[[[[...` nested deeper than the interpreter's stack.
_YAML_VALUE_ERRORS = (ValueError, AttributeError, RecursionError)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> typed values (YAML scalars). `data_vars.name=X` sets one data var."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{pair}' is not key=value.", "write e.g. learning_rate=1e-4.")
        if "." in key:  # a data var is text: kept verbatim (007 stays 007)
            parent, child = key.split(".", 1)
            if not isinstance(values.get(parent), dict):  # after `data_vars=5`: the later override wins
                values[parent] = {}
            values[parent][child] = raw
            continue
        try:
            values[key] = yaml.safe_load(raw) if raw else None
        except (yaml.YAMLError, *_YAML_VALUE_ERRORS):
            values[key] = raw
    return values


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}", "check the path.")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}).",
                          "save the file as UTF-8.") from None
    except OSError as exc:  # is_file() itself raises for e.g. a name longer than the OS allows
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}", "check the path.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}",
                          "fix the YAML syntax; keys are flat, e.g. `learning_rate: 1.0e-4`.") from None
    except RecursionError:
        raise ConfigError(f"{p}: values are nested too deeply to read.",
                          "keys are flat, e.g. `learning_rate: 1.0e-4`; values are scalars, short "
                          "lists or (data_vars) one mapping.") from None
    except _YAML_VALUE_ERRORS as exc:
        reason = str(exc).split(";")[0] if isinstance(exc, ValueError) else "it does not fit its !!tag"
        raise ConfigError(f"{p}: a value YAML cannot read ({reason}).",
                          "quote a value meant as text, e.g. `output_dir: '2001-13-45'`.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of key: value.",
                          "write one key per line, e.g. `model_name_or_path: default`.")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + key=value overrides -> validated RunConfig."""
    values = read_yaml(path) if path else {}
    extra = parse_overrides(overrides or [])
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return build_config(values, source=str(path) if path else "command line")


def describe_keys() -> str:
    """Help text: every key with its type, default and description, in schema order."""
    lines = []
    for name, field in RunConfig.model_fields.items():
        if name == "not_applied":
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {name} (default {default!r})\n      {field.description}")
    accepted = ", ".join(sorted(ACCEPTED_NOT_APPLIED))
    lines.append(f"\n  Accepted for compatibility, not applied in a single-process run: {accepted}")
    off_only = ", ".join(f"{k} ({v[0]!r})" for k, v in sorted(NOT_SUPPORTED.items()))
    lines.append(f"  LLaMA-Factory keys accepted only at their default (the feature is not in lmtune): "
                 f"{off_only}")
    return "\n".join(lines)
