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
    "overwrite_cache": "encoded data is not cached yet: every run encodes afresh",
    "preprocessing_num_workers": "encoding runs in the training process",
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
        None, description="Chat template name (LLaMA-Factory name); the tokenizer's own chat "
        "template is used when it has one.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust its source.")

    # --- method ------------------------------------------------------------------------------
    stage: Literal["sft"] = Field("sft", description="Training objective: sft (supervised fine-tuning).")
    do_train: bool = Field(True, description="Train (true) or only load and check (false).")
    finetuning_type: Literal["full", "freeze", "lora"] = Field(
        "lora", description="full: every weight; freeze: last layers or named modules; lora: adapters.")
    lora_target: str = Field(
        "all", description="'all' (every linear layer except the output head) or a comma list of "
        "module names, e.g. q_proj,v_proj.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA scale numerator; default 2 x lora_rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last n decoder layers (n > 0) or the first -n (n < 0).")
    freeze_trainable_modules: str = Field(
        "all", description="freeze: within the trainable layers, 'all' or a comma list of module "
        "names (e.g. mlp,self_attn).")

    # --- data --------------------------------------------------------------------------------
    dataset: str | None = Field(
        None, description="Comma list of dataset names from dataset_info.json, or paths to "
        ".json/.jsonl files.")
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


_METHOD_KEYS = {
    "lora": ("lora_target", "lora_rank", "lora_alpha", "lora_dropout", "adapter_name_or_path"),
    "freeze": ("freeze_trainable_layers", "freeze_trainable_modules"),
}


def check_combinations(cfg: RunConfig, explicitly_set: set[str]) -> None:
    """Refuse combinations that cannot work, with the fix. Runs after field-level validation."""
    if cfg.bf16 and cfg.fp16:
        raise ConfigError("bf16 and fp16 are both true.", "set only one of them (bf16 on CPUs and "
                          "recent GPUs).")
    for method, keys in _METHOD_KEYS.items():
        stray = sorted(k for k in keys if k in explicitly_set and cfg.finetuning_type != method)
        if stray:
            raise ConfigError(
                f"{', '.join(stray)} belong{'s' if len(stray) == 1 else ''} to finetuning_type: "
                f"{method}, but finetuning_type is {cfg.finetuning_type}.",
                f"remove {', '.join(stray)} or set finetuning_type: {method}.")
    if cfg.warmup_ratio > 0 and cfg.warmup_steps > 0:
        raise ConfigError("warmup_ratio and warmup_steps are both set.", "keep only one of them.")
    if cfg.warmup_steps >= 1 and cfg.warmup_steps != int(cfg.warmup_steps):
        raise ConfigError(f"warmup_steps: {cfg.warmup_steps} is neither a whole number of steps "
                          "nor a fraction below 1.", "use e.g. warmup_steps: 20 or warmup_ratio: 0.1.")
    if cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size):
        raise ConfigError(f"val_size: {cfg.val_size} is neither a fraction below 1 nor a row count.",
                          "use e.g. val_size: 0.1 or val_size: 50.")
    if cfg.eval_strategy != "no" and cfg.val_size == 0:
        raise ConfigError(f"eval_strategy: {cfg.eval_strategy} but val_size is 0, so there is "
                          "nothing to evaluate on.", "set val_size: 0.1 (or eval_strategy: no).")
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
    valid = known_keys()
    unknown = [k for k in values if k not in valid]
    if unknown:
        key = unknown[0]
        guess = _closest(key, valid + list(ACCEPTED_NOT_APPLIED))
        hint = f"did you mean '{guess}'?" if guess else "see `lmtune train --help` for every key."
        raise ConfigError(f"{source}: unknown key '{key}'.", hint)
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
    return "\n".join(lines)
