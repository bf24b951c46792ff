"""stage: sft. Supervised fine-tuning on conversations: cross-entropy on the assistant replies only.

Reads top to bottom: output folder -> tokenizer and model -> data (encoded, packed when asked) ->
method -> the shared loop with the token-level objective below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import set_seed

from lmtune.config import RunConfig
from lmtune.data.batching import model_inputs
from lmtune.data.encode import IGNORE_INDEX
from lmtune.data.pipeline import prepare_data, training_rows
from lmtune.models.load import load_model, load_tokenizer, resolve_model, stop_token_ids
from lmtune.models.methods import apply_method
from lmtune.train.checkpoint import prepare_run
from lmtune.train.engine import Batch, Objective, fit


def target_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) at the positions whose next token trains.

    The output head (vocab x hidden, a large share of a small model's FLOPs) runs only where a label
    exists, instead of on every position as model(...).logits would. Models that post-process logits
    (final softcapping) and prompt-side adapters (prefix, prompt, ptuning), whose virtual tokens
    exist only inside peft's forward, take the full forward."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    prompt_side = isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning
    inputs = model_inputs(batch)  # packed batches: position ids instead of the padding mask
    if prompt_side or getattr(base.config, "final_logit_softcapping", None):
        logits = model(**inputs).logits
        # Prompt and p-tuning put their virtual tokens' positions first; the text's are the last.
        logits = logits[:, -batch["input_ids"].shape[1]:]
        return logits[:, :-1][mask], labels[mask]
    hidden = base.get_decoder()(**inputs).last_hidden_state
    return base.get_output_embeddings()(hidden[:, :-1][mask]), labels[mask]


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    logits, labels = target_logits(model, batch)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def count_targets(batch: Batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


SFT_OBJECTIVE = Objective(loss=token_loss_sum, units=count_targets)


def run(cfg: RunConfig) -> dict[str, Any]:
    output_dir = Path(cfg.output_dir)
    resume_dir = prepare_run(output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir,
                             cfg.to_yaml_dict())
    set_seed(cfg.seed)

    model_path = resolve_model(cfg.model_name_or_path)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    model = load_model(model_path, cfg.trust_remote_code)

    data = prepare_data(cfg, tokenizer, stop_token_ids(tokenizer, model))
    train_rows, val_rows = training_rows(data, cfg, model.config)
    data.report.show()
    data.report.save(output_dir / "data_report.json")

    model = apply_method(model, cfg)
    if not cfg.do_train:
        print("do_train is false: data, model and method checked; nothing trained.")
        return {}
    return fit(cfg, model, tokenizer, train_rows, val_rows, SFT_OBJECTIVE, output_dir, resume_dir,
               extra_results={"train_rows": len(train_rows), "val_rows": len(val_rows)})
