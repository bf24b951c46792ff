"""The schema: every key a YAML file may set, typed, with its one-line documentation.

Also the catalogues of LLaMA-Factory keys that are accepted but not applied here, or accepted only at
their default. Combination rules live in rules.py, YAML and override parsing in io.py.
"""

from __future__ import annotations

import json
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
    "low_cpu_mem_usage": "weights are always loaded directly",
    "use_fast_tokenizer": "the tokenizer's own fast implementation is always used",
    "ray_num_workers": "only matters for Ray launches",
    "disable_gradient_checkpointing": "gradient checkpointing is controlled by gradient_checkpointing",
    "include_num_input_tokens_seen": "tokens seen are always logged",
    "remove_unused_columns": "records are encoded by lmtune, never by column name",
    "hf_hub_token": "the hub libraries read the token from HF_TOKEN or `hf auth login`",
    # LLaMA-Factory's model, data and generation arguments
    "cache_dir": "hub downloads go to the Hugging Face cache (set HF_HOME to move it)",
    "ms_hub_token": "models come from the Hugging Face hub or local folders, not ModelScope",
    "om_hub_token": "models come from the Hugging Face hub or local folders, not Modelers",
    "print_param_status": "trainable and total parameter counts are always logged and written to "
                          "all_results.json",
    "use_kv_cache": "generation always uses the KV cache; training never needs it",
    "offload_folder": "weights are never offloaded to disk",
    "preprocessing_batch_size": "rows are encoded one record at a time; the batch size of the "
                                "encoding pass does not change them",
    "data_shared_file_system": "only changes which process encodes first on several machines",
    "pissa_convert": "a pissa_init adapter is always saved converted to plain LoRA",
    "upcast_layernorm": "layer norms are float32 already: weights load in float32, and a quantized "
                        "base keeps its norms in float32",
    "upcast_lmhead_output": "token losses and log-probs are always computed from float32 logits",
    "include_effective_tokens_per_second": "tokens per second are always logged",
    "max_length": "answers are bounded by max_new_tokens",
    "download_mode": "benchmarks are read from task_dir",
    **dict.fromkeys(("vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank",
                     "vllm_config"), "serve answers with its built-in backend, so vLLM's engine "
                    "settings have nothing to set"),
    # HF Seq2SeqTrainingArguments (LLaMA-Factory's TrainingArguments inherit them)
    **dict.fromkeys(("dataloader_persistent_workers", "dataloader_prefetch_factor",
                     "dataloader_multiprocessing_context", "dataloader_in_order"),
                    "batches come from pre-tokenised tensors in memory"),
    **dict.fromkeys(("ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend"),
                    "lmtune sets up DDP itself (nccl on GPUs, gloo on CPUs; buffers not broadcast)"),
    "tf32": "TensorFloat-32 matmuls are left at torch's default",
    "torch_empty_cache_steps": "the CUDA cache is left to torch",
    "use_cache": "the KV cache is off while training and on while generating",
    "log_on_each_node": "the first process logs for all",
    "logging_nan_inf_filter": "a non-finite loss stops the run instead of being filtered from logs",
    "log_level": "messages are lmtune's own; --debug shows tracebacks",
    "log_level_replica": "messages are lmtune's own; only the first process prints",
    "disable_tqdm": "long work always shows a progress bar",
    "prediction_loss_only": "evaluation computes the loss (eval_generate_samples adds generation)",
    "eval_do_concat_batches": "evaluation keeps no logits, only the loss",
    "eval_use_gather_object": "evaluation keeps no logits, only the loss",
    "eval_accumulation_steps": "evaluation keeps no logits, only the loss",
    "include_for_metrics": "evaluation keeps no logits, only the loss",
    "batch_eval_metrics": "evaluation keeps no logits, only the loss",
    "restore_callback_states_from_checkpoint": "lmtune has no Trainer callbacks",
    "eval_on_start": "with eval_strategy steps or epoch, the val split is always evaluated before "
                     "the first update (logged as step 0)",
    "label_names": "labels are built by lmtune's encoder",
    "length_column_name": "rows are encoded by lmtune, never by column name",
    "skip_memory_metrics": "peak memory is measured by `lmtune plan`",
    "local_rank": "set by the launcher (torchrun, accelerate launch)",
    "use_reentrant_gc": "gradient checkpointing uses the variant transformers chooses",
    "gradient_checkpointing_kwargs": "gradient checkpointing uses the variant transformers chooses",
    # Older transformers' TrainingArguments, still found in LLaMA-Factory YAMLs
    "include_tokens_per_second": "tokens per second are always logged",
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
    "optim_args": (None, "optim takes no extra arguments here; remove it."),
    "optim_target_modules": (None, "galore_target / apollo_target name the layers; remove it."),
    "badam_mode": ("layer", "BAdam's ratio mode updates a random share of every weight through "
                   "sparse masks its optimizer keeps as Python state, which checkpoints cannot "
                   "resume; use badam_mode: layer."),
    "badam_update_ratio": (0.05, "a setting of badam_mode: ratio, which is refused; remove it."),
    "badam_mask_mode": ("adjacent", "a setting of badam_mode: ratio, which is refused; remove it."),
    # LLaMA-Factory's model arguments
    "adapter_folder": (None, "give the adapter's own folder in adapter_name_or_path."),
    "split_special_tokens": (False, "special tokens written in the text stay single tokens."),
    "new_special_tokens_config": (None, "new special tokens are not added; remove it."),
    "init_special_tokens": ("noise_init", "new special tokens are not added; remove it."),
    "shift_attn": (False, "shift short attention (S2-Attn) is not implemented; remove it."),
    "mixture_of_depths": (None, "LLaMA-Factory takes Mixture-of-Depths from the mixture-of-depth "
                          "package (1.2.0, its last), which does not import with transformers 5 (it "
                          "reads transformers.TRANSFORMERS_CACHE, since removed); remove it."),
    "moe_aux_loss_coef": (None, "the router's auxiliary loss is not added to the loss; remove it."),
    "quantization_device_map": (None, "the quantized base is placed on the training device; remove it."),
    # LLaMA-Factory's data, finetuning and generation arguments
    "ignore_pad_token_for_loss": (True, "padding is never trained on (labels are padded with -100)."),
    "tool_format": (None, "tool calls are rendered by the tokenizer's chat template; remove it."),
    "preserve_thinking": (False, "earlier turns are rendered by the tokenizer's chat template, "
                          "which decides whether their reasoning is kept; remove it."),
    "use_swanlab": (False, "use report_to: swanlab."),
    "swanlab_project": ("llamafactory", "use report_to: swanlab with SWANLAB_PROJ_NAME in the "
                        "environment."),
    "swanlab_workspace": (None, "use report_to: swanlab with SWANLAB_WORKSPACE in the environment."),
    "swanlab_run_name": (None, "use report_to: swanlab with run_name."),
    "swanlab_mode": ("cloud", "use report_to: swanlab with SWANLAB_MODE in the environment."),
    "swanlab_api_key": (None, "put the key in SWANLAB_API_KEY, never in a config file."),
    "swanlab_logdir": (None, "use report_to: swanlab; its files go under output_dir."),
    "swanlab_lark_webhook_url": (None, "Lark notifications are not sent; remove it."),
    "swanlab_lark_secret": (None, "Lark notifications are not sent; remove it."),
    **dict.fromkeys(("profiler_output_dir", "profile_modules"),
                    (None, "the torch profiler is not wired in; remove it.")),
    "enable_torch_profiler": (False, "the torch profiler is not wired in; remove it."),
    "profiler_wait_steps": (1, "the torch profiler is not wired in; remove it."),
    "profiler_warmup_steps": (1, "the torch profiler is not wired in; remove it."),
    "profiler_active_steps": (1, "the torch profiler is not wired in; remove it."),
    "profiler_repeat": (1, "the torch profiler is not wired in; remove it."),
    "profiler_record_shapes": (True, "the torch profiler is not wired in; remove it."),
    "profiler_profile_memory": (True, "the torch profiler is not wired in; remove it."),
    "profiler_with_stack": (True, "the torch profiler is not wired in; remove it."),
    # HF Seq2SeqTrainingArguments
    "average_tokens_across_devices": (True, "the loss is always normalised by the target tokens "
                                      "of all processes."),
    "label_smoothing_factor": (0.0, "label smoothing is not implemented; remove it."),
    "bf16_full_eval": (False, "evaluation runs in the training precision (bf16: mixed)."),
    "fp16_full_eval": (False, "evaluation runs in the training precision (fp16: mixed)."),
    "activation_checkpointing": (None, "use gradient_checkpointing: true."),
    "activation_checkpointing_kwargs": (None, "use gradient_checkpointing: true."),
    "torch_compile": (False, "torch.compile is not applied; remove it."),
    "torch_compile_backend": (None, "torch.compile is not applied; remove it."),
    "torch_compile_mode": (None, "torch.compile is not applied; remove it."),
    "auto_find_batch_size": (False, "`lmtune plan` estimates the memory of a batch size before "
                             "training; set per_device_train_batch_size."),
    "logging_strategy": ("steps", "logs are written every logging_steps."),
    "project": ("huggingface", "trackio is not a tracker lmtune writes to; see report_to."),
    "trackio_space_id": (None, "trackio is not a tracker lmtune writes to; see report_to."),
    "trackio_bucket_id": (None, "trackio is not a tracker lmtune writes to; see report_to."),
    "trackio_static_space_id": (None, "trackio is not a tracker lmtune writes to; see report_to."),
    "eval_delay": (0, "evaluation starts at the first eval_steps; remove it."),
    "save_on_each_node": (False, "checkpoints are written once, by the first process."),
    "enable_jit_checkpoint": (False, "a stop request (Ctrl-C, SIGTERM) already writes a checkpoint."),
    "push_to_hub": (False, "lmtune never uploads; upload output_dir with `hf upload`."),
    **dict.fromkeys(("hub_token", "hub_private_repo", "hub_model_id", "hub_revision"),
                    (None, "lmtune never uploads; upload output_dir with `hf upload`.")),
    "hub_strategy": ("every_save", "lmtune never uploads; upload output_dir with `hf upload`."),
    "hub_always_push": (False, "lmtune never uploads; upload output_dir with `hf upload`."),
    "ignore_data_skip": (False, "a resumed run always continues at its saved data position."),
    "full_determinism": (False, "runs are seeded by seed; deterministic kernels are not forced."),
    "data_seed": (None, "seed orders the data as well."),
    "use_cpu": (False, "a CUDA GPU is used when present; hide it with CUDA_VISIBLE_DEVICES= to "
                "train on the CPU."),
    "accelerator_config": (None, "lmtune configures accelerate itself; remove it."),
    "parallelism_config": (None, "use fsdp / deepspeed for several processes; remove it."),
    "dataloader_drop_last": (False, "the last, smaller batch of an epoch is always trained."),
    "train_sampling_strategy": ("random", "training rows are always shuffled (by seed)."),
    "debug": ("", "HF's debug modes are not wired in; lmtune's --debug shows tracebacks."),
    "do_eval": (False, "evaluation follows eval_strategy: set eval_strategy: steps (or epoch) "
                "with val_size or eval_dataset."),
    "sortish_sampler": (False, "training rows are always shuffled (by seed)."),
    "generation_max_length": (None, "use max_new_tokens."),
    # Older transformers' TrainingArguments, still found in LLaMA-Factory YAMLs
    "evaluation_strategy": ("no", "transformers renamed it; use eval_strategy."),
    "save_safetensors": (True, "outputs are always safetensors."),
    "fsdp_transformer_layer_cls_to_wrap": (None, "give it in fsdp_config: "
                                           "{transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}."),
    "generation_num_beams": (None, "use num_beams."),
    "generation_config": (None, "set do_sample, temperature, top_p, top_k, num_beams and "
                          "max_new_tokens directly."),
}


# LLaMA-Factory keys for features that need hardware, kernels or launchers lmtune does not drive,
# or inputs a text model cannot take. As with NOT_SUPPORTED, the LLaMA-Factory default loads (their
# example YAMLs often spell it out) and any other value is refused with the reason and what to use.
_MULTIMODAL = ("lmtune trains text models, and image, video or audio inputs are refused rather "
               "than trained as text; remove it and use a text model and text data.")
_KT = "KTransformers (CPU/GPU hybrid MoE kernels) is not included; remove it."
_MEGATRON = ("Megatron-Core parallelism is not included; use fsdp or deepspeed for several "
             "processes.")
_SGLANG = "infer_backend sglang is not included; serve uses its built-in backend."
_FP8 = "FP8 training needs FP8 tensor cores (Hopper GPUs or newer) and is not included; use bf16."
_RAY = "Ray launches are not included; launch several processes with torchrun or accelerate."
_LIGER = "Liger's Triton kernels run on CUDA GPUs only and are not included; remove it."
_UNSLOTH = "Unsloth's kernels run on CUDA GPUs only and are not included; remove it."
# Another branch implements these (export formats); until then they are refused like any feature
# this build lacks.
_NOT_IN_THIS_BUILD = "not in this build of lmtune; remove it."
REFUSED_FEATURES: dict[str, tuple[Any, str]] = {
    "image_max_pixels": (768 * 768, _MULTIMODAL),
    "image_min_pixels": (32 * 32, _MULTIMODAL),
    "image_do_pan_and_scan": (False, _MULTIMODAL),
    "crop_to_patches": (False, _MULTIMODAL),
    "video_max_pixels": (256 * 256, _MULTIMODAL),
    "video_min_pixels": (16 * 16, _MULTIMODAL),
    "video_fps": (2.0, _MULTIMODAL),
    "video_maxlen": (128, _MULTIMODAL),
    "use_audio_in_video": (False, _MULTIMODAL),
    "audio_sampling_rate": (16000, _MULTIMODAL),
    "media_dir": (None, _MULTIMODAL),
    "freeze_vision_tower": (True, _MULTIMODAL),
    "freeze_multi_modal_projector": (True, _MULTIMODAL),
    "freeze_language_model": (False, _MULTIMODAL),
    "use_kt": (False, _KT),
    **dict.fromkeys(("kt_cpu_activation", "kt_weight_path", "kt_non_expert_weight_path",
                     "kt_expert_checkpoint_path", "kt_use_lora_experts", "kt_lora_expert_num",
                     "kt_lora_expert_intermediate_size", "kt_config"), (None, _KT)),
    "use_mca": (False, _MEGATRON),
    "use_megatron_bridge": (False, _MEGATRON),
    "use_hyper_parallel": (False, _MEGATRON),
    "hyper_parallel_args": (None, _MEGATRON),
    "hyper_parallel_cp_size": (1, _MEGATRON),
    **dict.fromkeys(("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "context_parallel_size"), (1, _MEGATRON)),
    **dict.fromkeys(("virtual_pipeline_model_parallel_size", "recompute_granularity",
                     "recompute_method", "recompute_num_layers",
                     "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
                     "bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                     "cross_entropy_loss_fusion", "moe_grouped_gemm", "moe_token_dispatcher_type",
                     "calculate_per_token_loss", "megatron_pretrained_checkpoint", "extra_config"),
                    (None, _MEGATRON)),
    **dict.fromkeys(("sequence_parallel", "use_packed_sequences", "export_hf_on_finish"),
                    (False, _MEGATRON)),
    **dict.fromkeys(("use_distributed_optimizer", "overlap_param_gather", "overlap_grad_reduce"),
                    (True, _MEGATRON)),
    "mixed_precision": ("bf16_mixed", _MEGATRON + " Mixed precision is bf16 or fp16."),
    "sglang_maxlen": (4096, _SGLANG),
    "sglang_mem_fraction": (0.7, _SGLANG),
    "sglang_tp_size": (-1, _SGLANG),
    "sglang_config": (None, _SGLANG),
    "sglang_lora_backend": ("triton", _SGLANG),
    "fp8": (False, _FP8),
    "fp8_backend": ("auto", _FP8),
    "fp8_enable_fsdp_float8_all_gather": (False, _FP8),
    "ray_init_kwargs": (None, _RAY),
    "master_addr": (None, _RAY),
    "master_port": (None, _RAY),
    "enable_liger_kernel": (False, _LIGER),
    "use_liger_kernel": (False, _LIGER),
    "liger_kernel_config": (None, _LIGER),
    "use_unsloth": (False, _UNSLOTH),
    "use_unsloth_gc": (False, _UNSLOTH),
    "use_v1_kernels": (False, "LLaMA-Factory's v1 kernels (fused GPU kernels) are not included; "
                       "remove it."),
    # Export options (quantized export, upload, inference dtype).
    **{key: (default, "GPTQ quantization needs a CUDA GPU and the optimum and gptqmodel packages, "
             "which lmtune neither needs nor installs; remove it. For 8-bit weights use "
             "export_format: gguf with export_gguf_type: q8_0, or quantize the export with "
             "gptqmodel on a CUDA machine.")
       for key, default in (("export_quantization_bit", None), ("export_quantization_dataset", None),
                            ("export_quantization_nsamples", 128),
                            ("export_quantization_maxlen", 1024))},
    "export_hub_model_id": (None, "lmtune never uploads; upload export_dir with `hf upload`."),
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
    model_revision: str = Field(
        "main", description="Hub models: the branch, tag or commit to fetch (local folders have "
        "none).")
    adapter_name_or_path: str | None = Field(
        None, description="Comma list of PEFT adapters (folders or hub ids owner/name); all but "
        "the last are merged, training continues on the last.")
    template: str | None = Field(
        None, description="Chat template name (LLaMA-Factory name) for a tokenizer without one: "
        "alpaca, chatml, llama2, llama3, mistral, qwen, gemma, deepseekcoder, default, empty. A "
        "tokenizer's own template always wins; a different name given for it is reported.")
    add_tokens: str | None = Field(
        None, description="Comma list of new (normal) tokens added to the tokenizer; the embeddings "
        "and output head grow to fit (resize_vocab) and their new rows train.")
    add_special_tokens: str | None = Field(
        None, description="Comma list of new special tokens added to the tokenizer (never split, "
        "hidden by skip_special_tokens); the embeddings grow to fit as with add_tokens.")
    resize_vocab: bool = Field(
        False, description="Grow the embeddings and output head to the tokenizer's length (a "
        "multiple of 64) when it is longer, new rows set to the mean row plus noise, and train them "
        "(adapters: in modules_to_save). On by itself when add_tokens/add_special_tokens add any.")
    default_system: str | None = Field(
        None, description="System prompt for conversations whose data has none (replaces the "
        "template's own default); training, chat, serve and predict render it alike.")
    enable_thinking: bool | None = Field(
        True, description="Reasoning templates (Qwen3 and kin): true trains replies with their "
        "(possibly empty) reasoning block; false puts an empty block in the prompt, untrained; "
        "null leaves it to the template.")
    flash_attn: Literal["auto", "disabled", "eager", "sdpa", "flex", "fa2", "fa3"] = Field(
        "auto", description="Attention implementation: auto (training on packed rows on a CUDA GPU: "
        "flex, where the architecture has it; otherwise transformers chooses, sdpa for most), sdpa "
        "(torch's scaled_dot_product_attention), flex (torch's flex_attention, compiled on first "
        "use: skips the blocks where packed samples would meet), disabled or eager (plain matmuls), "
        "fa2 / fa3 (FlashAttention 2 / 3: CUDA GPUs with the package installed).")
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = Field(
        None, description="Stretch the rotary positions so cutoff_len fits when it is longer than "
        "the model's: by the whole factor that covers it, with this method.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust its source.")

    # --- method ------------------------------------------------------------------------------
    stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto"] = Field(
        "sft", description="Training objective: pt (continued pre-training on plain text), sft "
        "(supervised fine-tuning), rm (reward model), ppo (RLHF against a reward), dpo (DPO and kin "
        "on preference pairs), kto (KTO on answers tagged desirable or not).")
    do_train: bool = Field(True, description="Train (true) or only load and check (false).")
    train_from_scratch: bool = Field(
        False, description="finetuning_type full: train the model's architecture from freshly "
        "initialised weights (seeded) instead of its checkpoint's.")
    finetuning_type: Literal["full", "freeze", "lora", "oft", "adalora", "ia3", "prefix", "prompt",
                             "ptuning"] = Field(
        "lora", description="full: every weight; freeze: last layers or named modules; lora: "
        "low-rank adapters (DoRA, rsLoRA, PiSSA, LoRA+ by key); oft: a trained block-diagonal "
        "orthogonal rotation of each target layer's input; adalora: LoRA whose ranks shrink to "
        "a budget; ia3: learned scaling vectors; prefix: trained key/value prefixes in every layer; "
        "prompt: trained virtual input tokens; ptuning: virtual tokens made by a prompt encoder.")
    lora_target: str = Field(
        "all", description="lora, adalora: 'all' (every linear layer except the output head) or a "
        "comma list of module names, e.g. q_proj,v_proj.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r (adalora: adalora_init_r, adalora_target_r).")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA scale numerator; default 2 x lora_rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    oft_target: str = Field(
        "all", description="oft: 'all' (every linear layer except the output head) or a comma list "
        "of module names, e.g. q_proj,v_proj.")
    oft_block_size: int = Field(
        32, ge=0, description="oft: size of each orthogonal block (0 when oft_rank sets the number "
        "of blocks instead); a target's input width must be a multiple of it.")
    oft_rank: int = Field(
        0, ge=0, description="oft: number of orthogonal blocks per target (0 when oft_block_size "
        "sets their size instead).")
    module_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="oft: probability of leaving out a block's rotation in a "
        "training step (multiplicative dropout).")
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last n decoder layers (n > 0) or the first -n (n < 0).")
    use_llama_pro: bool = Field(
        False, description="freeze: LLaMA-Pro, train the blocks that block expansion added (the model "
        "must be one so expanded, e.g. by LLaMA-Factory's scripts/llama_pro.py): the last layer of "
        "each of freeze_trainable_layers equal groups, as LLaMA-Factory picks them.")
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
        None, description="lora, oft, adalora, ia3: comma list of modules trained in full and saved with "
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
    quantization_method: Literal["bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4",
                                 "fp8"] = Field(
        "bnb", description="Quantization library: bnb (bitsandbytes). LLaMA-Factory's other names "
        "are refused with the reason.")
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
    eval_on_each_dataset: bool = Field(
        False, description="With several eval_dataset: score each also on its own, logged as "
        "eval_<name>_loss (and its other metrics) beside the combined eval_loss.")
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
    tokenized_path: str | None = Field(
        None, description="Folder for the encoded train/val rows: the first run saves them there, "
        "later runs train from them without reading the data files or data keys (refused when "
        "the tokenizer or encoding settings differ).")
    streaming: bool = Field(
        False, description="Read, encode and shuffle the training data while training runs instead "
        "of loading, encoding and caching it first (stages sft, pt and rm; needs max_steps; val_size "
        "as a row count takes the first rows).")
    buffer_size: int = Field(
        16384, ge=1, description="streaming: rows in the shuffle buffer (the stream is shuffled "
        "within it, seeded by seed).")
    overwrite_cache: bool = Field(
        False, description="Encode the data afresh instead of reading encoded rows from the cache.")
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="Processes that encode the data in parallel (default one).")

    # --- output ------------------------------------------------------------------------------
    output_dir: str | None = Field(None, description="Where the run writes its model, logs and checkpoints.")
    overwrite_output_dir: bool = Field(
        False, description="Delete a non-empty output_dir before training.")
    logging_steps: int = Field(10, ge=1, description="Write a trainer_log.jsonl line every n steps.")
    logging_first_step: bool = Field(
        False, description="Also write a trainer_log.jsonl line after the first step.")
    save_strategy: Literal["steps", "epoch", "no"] = Field(
        "steps", description="When to write checkpoint-N: every save_steps, at the end of each "
        "epoch, or never (the finished run is saved either way).")
    save_steps: int = Field(
        500, ge=1, description="save_strategy steps: write checkpoint-N every n optimizer steps.")
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
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, description="Optimizer steps to run; overrides num_train_epochs when > 0.")
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                               "cosine_warmup_with_min_lr", "warmup_stable_decay",
                               "reduce_lr_on_plateau", "greedy"] = Field(
        "linear", description="Learning-rate schedule after warmup (transformers' get_scheduler "
        "names; reduce_lr_on_plateau and greedy, which follow a metric, are refused).")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(
        None, description="The schedule's own arguments, a mapping or JSON text, e.g. {num_cycles: "
        "2} for cosine_with_restarts or {min_lr_rate: 0.1} for cosine_with_min_lr.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warmup as a fraction of all steps.")
    warmup_steps: float = Field(
        0, ge=0, description="Warmup steps (a value < 1 is a fraction of all steps).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the gradient norm to this (0 = off).")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    optim: str = Field(
        "adamw_torch", description="Optimizer, by HF Trainer's name: adamw_torch, adamw_torch_fused, "
        "adafactor, sgd, adagrad, rmsprop, or bitsandbytes' adamw_8bit (= adamw_bnb_8bit), "
        "paged_adamw_8bit, paged_adamw_32bit (8-bit states; paging only on CUDA).")
    use_muon: bool = Field(
        False, description="Muon (torch.optim.Muon, its step scaled to AdamW's size so "
        "learning_rate carries over) for the 2-D hidden matrices, AdamW for embeddings, head, norms "
        "and biases.")
    use_galore: bool = Field(
        False, description="full, freeze: GaLore (the galore-torch package, extra `optimizers`): "
        "the gradients of the galore_target linear weights are projected to rank galore_rank, so "
        "their optimizer state is rank x width instead of the weight's size; optim adamw_torch, "
        "adamw_8bit or adafactor picks GaLore's AdamW, 8-bit AdamW or Adafactor.")
    galore_target: str = Field(
        "all", description="use_galore: comma list of linear module names, or all (every linear "
        "layer but the output head).")
    galore_rank: int = Field(16, ge=1, description="use_galore: rank of the gradient projection.")
    galore_update_interval: int = Field(
        200, ge=1, description="use_galore: steps between recomputing each projection (an SVD of "
        "the gradient).")
    galore_scale: float = Field(2.0, gt=0.0, description="use_galore: scale of the projected-back "
                                "update.")
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = Field(
        "std", description="use_galore: which side of each gradient is projected.")
    galore_layerwise: bool = Field(
        False, description="use_galore: one optimizer per weight, stepped as soon as that weight's "
        "gradient is complete in the backward pass, so the model's gradients are never held all at "
        "once; needs gradient_accumulation_steps: 1 and one process, and max_grad_norm cannot clip.")
    use_apollo: bool = Field(
        False, description="full, freeze: APOLLO (the apollo-torch package, extra `optimizers`): "
        "AdamW's moments on a rank-apollo_rank projection of the apollo_target gradients, used "
        "only to scale the raw gradient per channel (or per tensor): SGD-like memory.")
    apollo_target: str = Field(
        "all", description="use_apollo: comma list of linear module names, or all (every linear "
        "layer but the output head).")
    apollo_rank: int = Field(16, ge=1, description="use_apollo: rank of the projection.")
    apollo_update_interval: int = Field(
        200, ge=1, description="use_apollo: steps between drawing (or computing) a new projection.")
    apollo_scale: float = Field(32.0, gt=0.0, description="use_apollo: scale of the update.")
    apollo_proj: Literal["random", "svd"] = Field(
        "random", description="use_apollo: a seeded random projection, or GaLore's SVD one.")
    apollo_proj_type: Literal["std", "right", "left"] = Field(
        "std", description="use_apollo: which side of each gradient is projected.")
    apollo_scale_type: Literal["channel", "tensor"] = Field(
        "channel", description="use_apollo: one scaling factor per channel (APOLLO) or per tensor "
        "(APOLLO-Mini).")
    apollo_scale_front: bool = Field(
        False, description="use_apollo: scale the gradient before the norm-growth limiter rather "
        "than after.")
    apollo_layerwise: bool = Field(
        False, description="use_apollo: one optimizer per weight, stepped as soon as that weight's "
        "gradient is complete in the backward pass (see galore_layerwise).")
    use_badam: bool = Field(
        False, description="full: BAdam (the badam package, extra `optimizers`): block coordinate "
        "descent, Adam on one decoder layer at a time (switching every badam_switch_interval "
        "steps), so the optimizer state is one layer's; one process only.")
    badam_start_block: int | None = Field(
        None, ge=0, description="use_badam: the layer to train first (default: by "
        "badam_switch_mode).")
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] = Field(
        "ascending", description="use_badam: the order of the layers (fixed: only the first).")
    badam_switch_interval: int = Field(
        50, ge=1, description="use_badam: optimizer steps on a layer before the next.")
    badam_verbose: int = Field(0, ge=0, le=2, description="use_badam: 1 prints each switch, 2 "
                               "also the trained parameters.")
    use_adam_mini: bool = Field(
        False, description="full, freeze: Adam-mini (the adam-mini package, extra `optimizers`): "
        "one second-moment value per block (attention head, neuron, token) instead of per weight; "
        "about half AdamW's optimizer memory.")
    pure_bf16: bool = Field(
        False, description="Train in bfloat16 throughout: weights (an adapter method's adapter "
        "too), gradients and optimizer state, no fp32 master copy and no autocast; half the memory "
        "of bf16 mixed precision, but small updates round away.")
    use_dft_loss: bool = Field(
        False, description="sft: DFT, each target token's loss weighted by its (detached) "
        "probability, so tokens the model already finds likely count most.")
    use_eaft_loss: bool = Field(
        False, description="sft: EAFT, each target token's loss weighted by (H/3)^eaft_alpha, H the "
        "(detached) entropy of the model's top-20 next-token distribution.")
    eaft_alpha: float = Field(1.0, gt=0.0, description="use_eaft_loss: exponent of the entropy weight.")
    use_asft_loss: bool = Field(
        False, description="sft: ASFT, the DFT loss plus asft_alpha x KL(reference || model) per "
        "target token (the reference: the model before training).")
    asft_alpha: float = Field(0.1, ge=0.0, description="use_asft_loss: weight of the KL term.")
    neftune_noise_alpha: float | None = Field(
        None, gt=0.0, description="NEFTune: uniform noise of scale alpha / sqrt(length x hidden) on "
        "the input embeddings while training (never in eval or generation); 5 in the paper.")
    bf16: bool = Field(False, description="bfloat16 mixed precision (weights stay fp32).")
    fp16: bool = Field(False, description="float16 mixed precision with loss scaling (GPU only).")
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Adapter methods (lora, adalora, ia3, prefix, prompt, ptuning): auto "
        "stores the frozen base in bf16 (or the checkpoint's float16) under bf16, the precision bf16 "
        "computes in anyway, at half the memory; in fp32 compute it keeps a checkpoint stored in "
        "bf16 or float16 so (each layer casts its weight up as it computes: fp32 arithmetic on the "
        "values an fp32 load holds; prefix tuning excepted) and an fp32 one in fp32; bfloat16 stores the base in "
        "bf16 in fp32 compute too (an fp32 checkpoint is rounded once); float32 keeps it in full "
        "precision. Trained weights and saved adapters are fp32 either way.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower.")
    group_by_length: bool = Field(
        True, description="sft, pt, rm and dpo (losses summed row by row or pair by pair): inside "
        "each optimizer step, the step's rows go to its micro-batches by length, the shortest "
        "together, so less of each batch is padding. The step trains the same rows and the same "
        "summed loss either way. Unlike HF Trainer's key of this name, no row ever moves to "
        "another step; false keeps the micro-batches as drawn. (kto's batch-level KL estimate "
        "depends on which rows share a batch, so kto keeps them as drawn.)")
    checkpoint_every_n_layers: int = Field(
        1, ge=1, description="gradient_checkpointing: recompute only every n-th decoder layer (the "
        "1st, the (n+1)-th, ...) and keep the others' activations: 2 buys back about half the "
        "speed checkpointing costs for about half the memory it saves.")
    chunked_cross_entropy: bool = Field(
        True, description="Run the output head and its cross-entropy a chunk of target positions "
        "at a time, forming the gradients in the same pass, so the logits of a whole batch "
        "(positions x vocabulary) never exist at once: the same values, far less memory on a large "
        "vocabulary. false: the head on every target position at once, then the loss. Heads that "
        "are not a plain linear layer (an adapter or quantized layer on lm_head, ZeRO-3) always "
        "run whole.")
    allocator: Literal["mimalloc", "system"] = Field(
        "mimalloc", description="Memory allocator of `lmtune train` on Linux: mimalloc (installed "
        "with lmtune; the process restarts itself with it preloaded; one-process runs only) keeps "
        "the peak memory near what the step holds; system keeps the C library's malloc, which on "
        "the CPU can peak a third higher on the same steps.")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")
    disable_shuffling: bool = Field(
        False, description="Train on the rows in the order the data gives them, every epoch, "
        "instead of a seeded shuffle.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="When to compute eval loss on the val split.")
    eval_steps: int | None = Field(None, ge=1, description="Eval every n steps; default logging_steps.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Rows per eval batch.")
    load_best_model_at_end: bool = Field(
        False, description="Write the weights of the best evaluation (by metric_for_best_model) "
        "as the run's output instead of the last step's.")
    metric_for_best_model: str | None = Field(
        None, description="With load_best_model_at_end or early_stopping_steps: the evaluation "
        "metric that decides which is best (eval_ may be left out); default loss.")
    greater_is_better: bool | None = Field(
        None, description="Whether a higher metric_for_best_model is better; default: false for "
        "names ending in loss, true otherwise.")
    early_stopping_steps: int | None = Field(
        None, ge=1, description="Stop after this many evaluations in a row without a better "
        "metric_for_best_model (LLaMA-Factory's name; it counts evaluations, not steps).")
    compute_accuracy: bool = Field(
        False, description="sft: also log the share of reply tokens the model ranks first "
        "(accuracy while training, eval_accuracy at evaluations).")
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
        "reshard_after_forward, activation_checkpointing, state_dict_type: SHARDED_STATE_DICT or "
        "FULL_STATE_DICT for checkpoints).")
    deepspeed: str | None = Field(
        None, description="DeepSpeed JSON config (ZeRO stage 2/3, offload): DeepSpeed's engine "
        "partitions the run over its processes (torchrun, --nproc; CUDA or CPUs); needs the "
        "deepspeed extra. Its \"auto\" values come from the YAML.")

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
    eval_num_beams: int | None = Field(
        None, ge=1, description="predict and eval_generate_samples: beams of beam search there, "
        "instead of num_beams (which chat and serve keep).")
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
    export_size: float = Field(
        5, gt=0, description="Largest safetensors shard, in GB (a GGUF is always one file).")
    export_device: Literal["cpu", "auto"] = Field(
        "cpu", description="Where adapters merge: cpu, or auto (the GPU when one is present).")
    export_legacy_format: Literal[False] = Field(
        False, description="Must stay false: exports are safetensors only.")
    export_full_precision: bool = Field(
        False, description="Merge into the base loaded in full precision even though training used "
        "a quantized one (quantization_bit) or the base checkpoint is quantized.")
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="export: dtype of the exported weights; auto keeps the base "
        "checkpoint's (bf16 for a bf16 one; float32 for 'default', dequantised from its GGUF). "
        "chat and serve compute in float32 whatever it says.")
    export_format: Literal["hf", "gguf"] = Field(
        "hf", description="export: hf (safetensors folder) or gguf (one .gguf file for llama.cpp "
        "and Ollama, llama-architecture models; an lmtune key, LLaMA-Factory has none).")
    export_gguf_type: Literal["auto", "f32", "f16", "bf16", "q8_0"] = Field(
        "auto", description="export_format gguf: tensor type of the weights (auto: the export "
        "dtype, as infer_dtype decides); norms stay f32.")

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

    @field_validator("lr_scheduler_kwargs", mode="before")
    @classmethod
    def _kwargs_from_json(cls, value: Any) -> Any:
        # HF TrainingArguments take this as JSON text on the command line.
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("not a mapping or JSON text of one") from None
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
        # pure_bf16 computes in the weights' own bf16: autocast has nothing to do.
        return "bf16" if self.bf16 and not self.pure_bf16 else "fp16" if self.fp16 else "no"

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


