"""stage: dpo. Direct preference optimisation and its kin on chosen/rejected pairs.

pref_loss picks the objective (train/losses.py): sigmoid (DPO), ipo, hinge compare the policy's
preference with the reference's; orpo (odds ratio + SFT on the chosen reply) and simpo
(length-normalised margin) need no reference. Reads top to bottom: setup -> method -> reference
log-probs of every pair, once, before the first update -> the shared loop.

Logged per step and on the val split: reward_accuracy (share of pairs whose implicit reward ranks
chosen first), reward_margin, reward_chosen, reward_rejected. The implicit reward of a reply is
beta x (log pi - log ref) for the reference-based losses and beta x its mean token log-prob for
orpo and simpo.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtune.config import RunConfig
from lmtune.models.methods import apply_method
from lmtune.train.engine import Batch, Metrics, Objective, fit
from lmtune.train.forward import response_logps
from lmtune.train.losses import orpo_odds_ratio_loss, preference_loss
from lmtune.train.preference import collate_pairs, count_pairs, pair_length, reference_of, score_pairs
from lmtune.train.setup import start_run

REFERENCE_FREE = ("orpo", "simpo")


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> Metrics:
    n = len(chosen)
    return {"reward_accuracy": ((chosen > rejected).float().sum(), n),
            "reward_margin": ((chosen - rejected).sum(), n),
            "reward_chosen": (chosen.sum(), n), "reward_rejected": (rejected.sum(), n)}


def dpo_objective(cfg: RunConfig) -> Objective:
    beta, kind = cfg.pref_beta, cfg.pref_loss

    def loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        logps, counts = response_logps(model, batch, cfg.chunked_cross_entropy)
        n = count_pairs(batch)
        chosen, rejected = logps[:n], logps[n:]
        chosen_avg, rejected_avg = chosen / counts[:n], rejected / counts[n:]
        if kind == "orpo":
            losses = -chosen_avg + orpo_odds_ratio_loss(beta, chosen_avg, rejected_avg)
        elif kind == "simpo":
            losses = preference_loss("simpo", beta, chosen_avg, rejected_avg,
                                     simpo_gamma=cfg.simpo_gamma)
        else:
            losses = preference_loss(kind, beta, chosen, rejected, batch["ref_chosen"],
                                     batch["ref_rejected"], label_smoothing=cfg.dpo_label_smoothing)
        if cfg.pref_ftx > 0:
            losses = losses - cfg.pref_ftx * chosen_avg
        with torch.no_grad():
            if kind in REFERENCE_FREE:
                rewards = beta * chosen_avg, beta * rejected_avg
            else:
                rewards = beta * (chosen - batch["ref_chosen"]), beta * (rejected - batch["ref_rejected"])
        return losses.sum(), reward_metrics(*rewards)

    return Objective(loss=loss, units=count_pairs, collate=collate_pairs, length=pair_length)


def run(cfg: RunConfig) -> dict[str, Any]:
    inputs = start_run(cfg)
    model = apply_method(inputs.take_model(), cfg)
    pad_id = inputs.tokenizer.pad_token_id
    if cfg.pref_loss in REFERENCE_FREE:
        train = score_pairs(inputs.train_rows, None, cfg, pad_id, "train")
        val = score_pairs(inputs.val_rows, None, cfg, pad_id, "val")
    else:
        with reference_of(cfg, model, inputs.tokenizer) as reference:
            train = score_pairs(inputs.train_rows, reference, cfg, pad_id, "train")
            val = score_pairs(inputs.val_rows, reference, cfg, pad_id, "val")
    return fit(cfg, model, inputs.tokenizer, train, val, dpo_objective(cfg), inputs.output_dir,
               inputs.resume_dir, extra_results=inputs.row_counts(),
               eval_groups=inputs.val_groups)
