"""stage: sft. Supervised fine-tuning on conversations: cross-entropy on the assistant replies only
(or a reweighting of it: DFT, EAFT, ASFT).

Reads top to bottom: output folder, tokenizer, model and data (train/setup.py; encoded, packed when
asked) -> method -> the shared loop with the token-level objective below.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftModel

from lmtune.config import RunConfig
from lmtune.data.batching import row_length
from lmtune.models.methods import apply_method
from lmtune.train.engine import Batch, Metrics, Objective, fit
from lmtune.train.forward import count_targets, target_logits, token_loss_and_hits
from lmtune.train.losses import asft_token_losses, dft_token_losses, eaft_token_losses
from lmtune.train.setup import start_run


def token_objective(cfg: RunConfig) -> Objective:
    """The cross-entropy summed over the target tokens; with compute_accuracy also the share of
    them the model ranks first."""
    def loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        total, hits = token_loss_and_hits(model, batch, cfg.chunked_cross_entropy)
        return total, ({"accuracy": (hits, count_targets(batch))} if cfg.compute_accuracy else {})

    return Objective(loss=loss, units=count_targets, length=row_length)


def _reference_logits(model: torch.nn.Module) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
    """ASFT's reference: the model as it is now, before training. An adapter is switched off for
    the reference pass (no copy); full and freeze keep a frozen copy of the weights."""
    if isinstance(model, PeftModel):
        def reference(current: torch.nn.Module, batch: Batch) -> torch.Tensor:
            with torch.no_grad(), current.disable_adapter():
                return target_logits(current, batch)[0]
        return reference
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def reference(current: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return target_logits(frozen, batch)[0]
    return reference


def sft_objective(cfg: RunConfig, model: torch.nn.Module) -> Objective:
    """The token loss, or the rule of use_dft_loss / use_eaft_loss / use_asft_loss: each weights a
    target token's loss and sums, so the loop still normalises by the window's target tokens."""
    if not (cfg.use_dft_loss or cfg.use_eaft_loss or cfg.use_asft_loss):
        return token_objective(cfg)
    reference = _reference_logits(model) if cfg.use_asft_loss else None

    def loss(m: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        logits, labels = target_logits(m, batch)
        if cfg.use_dft_loss:
            tokens = dft_token_losses(logits, labels)
        elif cfg.use_eaft_loss:
            tokens = eaft_token_losses(logits, labels, cfg.eaft_alpha)
        else:
            tokens = asft_token_losses(logits, labels, reference(m, batch), cfg.asft_alpha)
        if not cfg.compute_accuracy:
            return tokens.sum(), {}
        correct = (logits.argmax(-1) == labels).sum().detach()
        return tokens.sum(), {"accuracy": (correct, len(labels))}

    return Objective(loss=loss, units=count_targets, length=row_length)


def run(cfg: RunConfig) -> dict[str, Any]:
    inputs = start_run(cfg)
    model = apply_method(inputs.take_model(), cfg)
    results = fit(cfg, model, inputs.tokenizer, inputs.train_rows, inputs.val_rows,
                  sft_objective(cfg, model), inputs.output_dir, inputs.resume_dir,
                  extra_results=inputs.row_counts(),
                  eval_groups=inputs.val_groups)
    if cfg.do_predict and results:
        from lmtune.evaluate.predict import predict_after_training

        del model, inputs  # predict reloads the run as saved
        results |= predict_after_training(cfg)
    return results
