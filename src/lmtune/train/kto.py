"""stage: kto. Kahneman-Tversky optimisation on single answers tagged desirable or undesirable.

Each row is a prompt and one answer. The loss pushes the implicit reward beta x (log pi - log ref) of
desirable answers above a reference point and of undesirable ones below it (train/losses.py). The
reference point is an estimate of KL(pi || ref) from MISMATCHED pairs: prompt i with the answer of
row i + 1, which says how far the policy drifted on text it is not trained to prefer. Reads top to
bottom: setup -> method -> reference log-probs of every answer and every mismatched pair, once ->
the shared loop.

Logged: reward_desirable and reward_undesirable (mean implicit reward of each kind) and kl (the
reference point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmtune.config import RunConfig
from lmtune.data.batching import collate
from lmtune.data.encode import IGNORE_INDEX, EncodedRow, KTORow
from lmtune.models.methods import apply_method
from lmtune.train.engine import Batch, Metrics, Objective, fit
from lmtune.train.losses import kto_loss
from lmtune.train.forward import response_logps
from lmtune.train.preference import reference_of, reference_reply_logps
from lmtune.train.setup import start_run


@dataclass
class ScoredAnswer:
    answer: EncodedRow
    mismatched: EncodedRow  # this row's prompt with another row's answer: for the KL estimate
    desirable: bool
    ref: float  # reference log-prob of the answer
    ref_mismatched: float


def mismatched_rows(rows: list[KTORow], cutoff_len: int) -> list[EncodedRow]:
    """Prompt i with the answer of row i + 1 (cyclically), cut to cutoff_len."""
    out = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        ids = (row.prompt_ids + other.completion_ids)[:cutoff_len]
        labels = ([IGNORE_INDEX] * len(row.prompt_ids) + other.completion_labels)[:cutoff_len]
        out.append(EncodedRow(ids, labels))
    return out


def score_answers(rows: list[KTORow], reference: torch.nn.Module, cfg: RunConfig, pad_id: int,
                  what: str) -> list[ScoredAnswer]:
    answers = [ScoredAnswer(r.row(), m, r.desirable, 0.0, 0.0)
               for r, m in zip(rows, mismatched_rows(rows, cfg.cutoff_len))]
    logps = reference_reply_logps(reference, answers, collate_answers, cfg, pad_id, what)
    for item, (ref, ref_mismatched) in zip(answers, logps):
        item.ref, item.ref_mismatched = ref, ref_mismatched
    return answers


def collate_answers(answers: list[ScoredAnswer], pad_id: int) -> Batch:
    batch = collate([a.answer for a in answers] + [a.mismatched for a in answers], pad_id)
    batch["desirable"] = torch.tensor([a.desirable for a in answers])
    batch["ref"] = torch.tensor([a.ref for a in answers])
    batch["ref_mismatched"] = torch.tensor([a.ref_mismatched for a in answers])
    return batch


def count_answers(batch: Batch) -> int:
    return len(batch["desirable"])


def kto_objective(cfg: RunConfig) -> Objective:
    beta = cfg.pref_beta

    def loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        logps, _ = response_logps(model, batch, cfg.chunked_cross_entropy)
        n = count_answers(batch)
        policy, policy_mismatched = logps[:n], logps[n:]
        # The reference point carries no gradient (as in the paper): it only sets the bar.
        kl = (policy_mismatched - batch["ref_mismatched"]).mean().clamp(min=0).detach()
        desirable = batch["desirable"]
        losses = kto_loss(beta, policy, batch["ref"], desirable, kl, cfg.kto_chosen_weight,
                          cfg.kto_rejected_weight)
        rewards = (beta * (policy - batch["ref"])).detach()
        n_good = int(desirable.sum())
        metrics: Metrics = {"kl": (kl * n, n)}
        if n_good:
            metrics["reward_desirable"] = (rewards[desirable].sum(), n_good)
        if n - n_good:
            metrics["reward_undesirable"] = (rewards[~desirable].sum(), n - n_good)
        return losses.sum(), metrics

    return Objective(loss=loss, units=count_answers, collate=collate_answers)


def run(cfg: RunConfig) -> dict[str, Any]:
    inputs = start_run(cfg)
    model = apply_method(inputs.take_model(), cfg)
    pad_id = inputs.tokenizer.pad_token_id
    with reference_of(cfg, model, inputs.tokenizer) as reference:
        train = score_answers(inputs.train_rows, reference, cfg, pad_id, "train")
        val = score_answers(inputs.val_rows, reference, cfg, pad_id, "val") if inputs.val_rows else []
    return fit(cfg, model, inputs.tokenizer, train, val, kto_objective(cfg), inputs.output_dir,
               inputs.resume_dir, extra_results=inputs.row_counts(),
               eval_groups=inputs.val_groups)
