"""stage: sft. Supervised fine-tuning on conversations: cross-entropy on the assistant replies only.

Reads top to bottom: output folder, tokenizer, model and data (train/setup.py; encoded, packed when
asked) -> method -> the shared loop with the token-level objective below.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from lmtune.config import RunConfig
from lmtune.data.batching import model_inputs
from lmtune.data.encode import IGNORE_INDEX
from lmtune.models.methods import apply_method
from lmtune.train.engine import Batch, Metrics, Objective, fit
from lmtune.train.setup import start_run


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


def _sft_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    return token_loss_sum(model, batch), {}


SFT_OBJECTIVE = Objective(loss=_sft_loss, units=count_targets)


def run(cfg: RunConfig) -> dict[str, Any]:
    inputs = start_run(cfg)
    model = apply_method(inputs.model, cfg)
    results = fit(cfg, model, inputs.tokenizer, inputs.train_rows, inputs.val_rows, SFT_OBJECTIVE,
                  inputs.output_dir, inputs.resume_dir, extra_results=inputs.row_counts())
    if cfg.do_predict and results:
        from lmtune.evaluate.predict import predict_after_training

        del model, inputs  # predict reloads the run as saved
        results |= predict_after_training(cfg)
    return results
