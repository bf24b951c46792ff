"""stage: sft. Supervised fine-tuning on conversations: cross-entropy on the assistant replies only.

Reads top to bottom: output folder, tokenizer, model and data (train/setup.py; encoded, packed when
asked) -> method -> the shared loop with the token-level objective below.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmtune.config import RunConfig
from lmtune.models.methods import apply_method
from lmtune.train.engine import Batch, Metrics, Objective, fit
from lmtune.train.forward import count_targets, target_logits, token_loss_sum
from lmtune.train.setup import start_run


def _sft_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    return token_loss_sum(model, batch), {}


def _sft_loss_and_accuracy(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """compute_accuracy: also the share of target tokens the model ranks first."""
    logits, labels = target_logits(model, batch)
    correct = (logits.argmax(-1) == labels).sum().detach()
    return F.cross_entropy(logits.float(), labels, reduction="sum"), {"accuracy": (correct, len(labels))}


SFT_OBJECTIVE = Objective(loss=_sft_loss, units=count_targets)
SFT_ACCURACY_OBJECTIVE = Objective(loss=_sft_loss_and_accuracy, units=count_targets)


def run(cfg: RunConfig) -> dict[str, Any]:
    inputs = start_run(cfg)
    model = apply_method(inputs.model, cfg)
    objective = SFT_ACCURACY_OBJECTIVE if cfg.compute_accuracy else SFT_OBJECTIVE
    results = fit(cfg, model, inputs.tokenizer, inputs.train_rows, inputs.val_rows, objective,
                  inputs.output_dir, inputs.resume_dir, extra_results=inputs.row_counts())
    if cfg.do_predict and results:
        from lmtune.evaluate.predict import predict_after_training

        del model, inputs  # predict reloads the run as saved
        results |= predict_after_training(cfg)
    return results
