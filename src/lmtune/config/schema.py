"""The schema: every key a YAML file may set, typed, with its one-line documentation.

Also the catalogues of LLaMA-Factory keys that are accepted but not applied here, or accepted only at
their default. Combination rules live in rules.py, YAML and override parsing in io.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

# Keys users bring from LLaMA-Factory / HF TrainingArguments that only change behaviour on other
# hardware or launchers (multi-GPU, DeepSpeed, dataloader workers). They are accepted so that existing
# YAMLs run unchanged, and listed at start-up as not applied in this run.
ACCEPTED_NOT_APPLIED: dict[str, str] = {
    "dataloader_num_workers": "batches come from pre-tokenised tensors in memory",
    "dataloader_pin_memory": "only matters on GPUs",
    "save_only_model": "checkpoints always hold everything needed to resume",
    "flash_attn": "the attention kernel is chosen by transformers for the device",
    "low_cpu_mem_usage": "weights are always loaded directly",
    "use_fast_tokenizer": "the tokenizer's own fast implementation is always used",
    "ray_num_workers": "only matters for Ray launches",
    "disable_gradient_checkpointing": "gradient checkpointing is controlled by gradient_checkpointing",
    "include_num_input_tokens_seen": "tokens seen are always logged",
    "remove_unused_columns": "records are encoded by lmtune, never by column name",
    "hf_hub_token": "the hub libraries read the token from HF_TOKEN or `hf auth login`",
    "model_revision": "hub models are fetched at their default revision",
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


TrackerName = Literal["none", "all", "tensorboard", "mlflow", "wandb", "swanlab"]


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
    report_to: TrackerName | list[TrackerName] = Field(
        "none", description="Experiment trackers that get trainer_log.jsonl's numbers and the run "
        "config: none, tensorboard, mlflow, wandb, swanlab, or all (every one installed); a comma "
        "list or YAML list. Offline by default (files under output_dir).")
    run_name: str | None = Field(
        None, description="The run's name in the trackers (default: output_dir's folder name).")
    logging_dir: str | None = Field(
        None, description="Where tensorboard writes its event files (default output_dir/runs).")

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
    frozen_dtype: Literal["auto", "float32"] = Field(
        "auto", description="Adapter methods (lora, adalora, ia3, prefix, prompt, ptuning) with bf16: "
        "auto stores the frozen base in bf16 (or the checkpoint's float16), the precision bf16 "
        "computes in anyway, at half the memory; float32 keeps it in full precision. Trained "
        "weights and saved adapters are fp32 either way.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower.")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="When to compute eval loss on the val split.")
    eval_steps: int | None = Field(None, ge=1, description="Eval every n steps; default logging_steps.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Rows per eval batch.")
    eval_generate_samples: int = Field(
        0, ge=0, description="sft: at every evaluation, also answer the first N val rows by greedy "
        "generation and log BLEU-4, ROUGE and exact match against their replies (0 = off).")
    resume_from_checkpoint: str | None = Field(
        None, description="'auto' (newest complete checkpoint in output_dir) or a checkpoint path.")

    # --- several processes (torchrun / accelerate launch / --nproc) ---------------------------
    ddp_timeout: int = Field(
        1800, ge=1, description="Seconds a rank waits for the others in a collective before the "
        "job fails (a crashed rank ends the job within this bound).")
    ddp_find_unused_parameters: bool | None = Field(
        None, description="DDP looks for parameters without a gradient each step (slower); "
        "needed only by models whose forward skips trainable modules.")
    fsdp: str | list[str] | None = Field(
        None, description="FSDP2 options as in LLaMA-Factory/HF ('full_shard auto_wrap', "
        "'offload'); shards weights, gradients and optimizer states across ranks.")
    fsdp_config: dict[str, Any] | str | None = Field(
        None, description="FSDP options: a dict or a JSON/YAML file (transformer_layer_cls_to_wrap, "
        "reshard_after_forward, cpu_ram_efficient_loading, activation_checkpointing).")
    deepspeed: str | None = Field(
        None, description="DeepSpeed JSON config (ZeRO stage 2/3, offload); needs the deepspeed "
        "extra and CUDA GPUs.")

    # --- generation (chat) -------------------------------------------------------------------
    do_sample: bool = Field(True, description="Sample in chat; --prompt answers greedily unless set.")
    temperature: float = Field(0.95, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(0.7, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Sample among the k most likely tokens (0 = all).")
    max_new_tokens: int = Field(512, ge=1, description="Most tokens generated per answer.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Penalty on repeated tokens (1 = off).")
    infer_backend: Literal["huggingface", "vllm", "sglang", "ktransformers"] = Field(
        "huggingface", description="serve: huggingface (lmtune's batched generation, many adapters "
        "on one base) or vllm (needs vLLM and a CUDA GPU; otherwise the built-in backend serves). "
        "sglang and ktransformers are refused.")
    num_beams: int = Field(1, ge=1, description="predict: beams of beam search (1 = greedy or sampling).")
    length_penalty: float = Field(
        1.0, description="predict with num_beams > 1: exponent on length when ranking beams (> 1 "
        "favours longer answers).")
    skip_special_tokens: bool = Field(
        True, description="predict: drop special tokens (end-of-turn and the like) from the "
        "decoded answers.")

    # --- predict and benchmarks ----------------------------------------------------------------
    do_predict: bool = Field(
        False, description="Generate answers for every eval_dataset row and score them against its "
        "replies (BLEU-4, ROUGE, exact match): after training, or alone with do_train: false.")
    predict_with_generate: bool = Field(
        False, description="LLaMA-Factory's switch for predicting by generation; lmtune always "
        "predicts by generating, so only false set explicitly with do_predict is refused.")
    task: str | None = Field(
        None, description="lmtune eval: benchmark and split, <folder>_<split>, e.g. mmlu_test, "
        "cmmlu_test, ceval_validation (a folder of task_dir with mapping.json and data/<split>/).")
    task_dir: str = Field(
        "evaluation", description="lmtune eval: folder holding the benchmark folders (MMLU / CMMLU "
        "/ C-Eval layout).")
    n_shot: int = Field(5, ge=0, description="lmtune eval: solved dev questions shown before each one.")
    lang: Literal["en", "zh"] = Field(
        "en", description="lmtune eval: language of the question frame (en: MMLU, zh: CMMLU, C-Eval).")
    batch_size: int = Field(4, ge=1, description="lmtune eval: questions per forward pass.")
    save_dir: str | None = Field(
        None, description="lmtune eval: where results.json, results.log and results.png go "
        "(default: print only).")
    replay: int | str | None = Field(
        None, description="Forgetting guard: the base model answers N general prompts (a count, "
        "from lmtune's built-in list) or the prompts of a JSON file before training; its own "
        "answers join the training data. Made once, then cached.")

    # --- export ------------------------------------------------------------------------------
    export_dir: str | None = Field(None, description="Where `lmtune export` writes the merged model.")
    export_size: int = Field(5, ge=1, description="Largest safetensors shard, in GB.")
    export_device: Literal["cpu", "auto"] = Field(
        "cpu", description="Where adapters merge: cpu, or auto (the GPU when one is present).")
    export_legacy_format: Literal[False] = Field(
        False, description="Must stay false: exports are safetensors only.")
    export_full_precision: bool = Field(
        False, description="Merge into the base loaded in full precision even though training used "
        "a quantized one (quantization_bit) or the base checkpoint is quantized.")

    # Keys from ACCEPTED_NOT_APPLIED that the YAML set, kept to report them.
    not_applied: dict[str, Any] = Field(default_factory=dict, exclude=True)
    # Keys given as null on the command line (`adapter_name_or_path=null`). Null there means none,
    # where leaving the key out lets a command work a value out (chat: the adapter in output_dir).
    # A YAML's null does not count: saved run configs list every key, null where nothing was given.
    _null_on_command_line: set[str] = PrivateAttr(default_factory=set)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",")]
        if isinstance(value, list) and "none" in value and set(value) != {"none"}:
            raise ValueError("'none' cannot be listed with trackers")
        return value

    @field_validator("replay", mode="before")
    @classmethod
    def _replay_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML `replay: true` would otherwise count as 1 prompt
            raise ValueError("replay is a prompt count or a prompts file, not true/false")
        return value

    @field_validator("output_dir", "export_dir", "dataset_dir", "resume_from_checkpoint", "ref_model")
    @classmethod
    def _home_folder(cls, value: str | None) -> str | None:
        # YAML and `key=value` reach lmtune without a shell, so `~/x` would be a folder named '~'.
        return str(Path(value).expanduser()) if value and value.startswith("~") else value

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

    def null_on_command_line(self, key: str) -> bool:
        return key in self._null_on_command_line

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able values, saved next to every checkpoint."""
        return self.model_dump(mode="json")


def split_list(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


