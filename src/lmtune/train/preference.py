"""What the preference stages (rm, dpo, kto) share: batches of replies to one prompt, the log-prob
of each reply under a model, and the reference model's log-probs, computed once.

A pair's chosen and rejected rows go into ONE batch (chosen rows first, then rejected), so the model
runs once per micro-batch. The reference log-probs are computed before the first update and stored
with each row: the reference cannot drift, no second model stays in memory, and each step runs one
forward instead of two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lmtune.config import RunConfig
from lmtune.data.batching import collate
from lmtune.data.encode import PreferenceRow
from lmtune.errors import ModelError
from lmtune.models.load import (load_model, load_tokenizer, model_options, move_to_device,
                                resolve_model)
from lmtune.models.methods import evaluation
from lmtune.train.engine import Batch
from lmtune.train.forward import response_logps


# --- pairs ----------------------------------------------------------------------------------------

@dataclass
class ScoredPair:
    """A preference pair and its reference log-probs (0 where the loss uses no reference)."""

    pair: PreferenceRow
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def collate_pairs(pairs: list[ScoredPair], pad_id: int) -> Batch:
    rows = [p.pair.chosen_row() for p in pairs] + [p.pair.rejected_row() for p in pairs]
    batch = collate(rows, pad_id)
    batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs])
    batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs])
    return batch


def count_pairs(batch: Batch) -> int:
    return len(batch["ref_chosen"])


def pair_length(scored: ScoredPair) -> int:
    """What a pair pads its batch to: its prompt and the longer of its replies."""
    pair = scored.pair
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


# --- the reference model --------------------------------------------------------------------------

def load_ref_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """cfg.ref_model, checked to share the policy's tokenizer. Loading draws random numbers (weight
    init before the checkpoint's weights arrive); the run's randomness must not depend on where its
    reference comes from, so the generator state is restored afterwards."""
    path = resolve_model(cfg.ref_model)
    if load_tokenizer(path, cfg.trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"ref_model {cfg.ref_model} has another tokenizer than "
                         f"{cfg.model_name_or_path}; their log-probs cannot be compared.",
                         "use a reference with the same tokenizer (usually the SFT model you start "
                         "from), or remove ref_model.")
    with torch.random.fork_rng(devices=[]):
        return load_model(path, cfg.trust_remote_code, **model_options(cfg))


@contextmanager
def reference_of(cfg: RunConfig, policy: torch.nn.Module,
                 tokenizer: PreTrainedTokenizerBase) -> Iterator[torch.nn.Module]:
    """The reference model: ref_model when set (loaded for this block only), else the policy as it is
    now, before its first update. Always in eval mode (no dropout)."""
    if cfg.ref_model is None:
        with evaluation(policy):
            yield policy
        return
    reference = load_ref_model(cfg, tokenizer)
    reference.eval()
    try:
        yield reference
    finally:
        del reference


def reference_reply_logps(model: torch.nn.Module, items: list[Any],
                          collate_fn: Callable[[list[Any], int], Batch], cfg: RunConfig, pad_id: int,
                          what: str) -> list[list[float]]:
    """For each item, the summed reply log-probs under `model` of each row `collate_fn` makes of it
    (a pair: chosen, rejected), in the run's precision, without gradients. Items are batched as eval
    batches them, so on the val split the policy's first eval matches the reference exactly."""
    device = move_to_device(model)
    out: list[list[float]] = []
    size = cfg.per_device_eval_batch_size
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for i in tqdm(range(0, len(items), size), desc=f"reference {what}", unit="batch",
                      mininterval=1.0, disable=len(items) <= 4 * size):
            chunk = items[i: i + size]
            batch = {k: v.to(device) for k, v in collate_fn(chunk, pad_id).items()}
            logps = response_logps(model, batch, cfg.chunked_cross_entropy)[0].float()
            out += logps.view(-1, len(chunk)).T.tolist()  # rows are laid out kind by kind
    return out


def score_pairs(pairs: list[PreferenceRow], reference: torch.nn.Module | None, cfg: RunConfig,
                pad_id: int, what: str) -> list[ScoredPair]:
    """Attach reference log-probs to every pair (none when `reference` is None)."""
    scored = [ScoredPair(p) for p in pairs]
    if reference is not None and pairs:
        logps = reference_reply_logps(reference, scored, collate_pairs, cfg, pad_id, what)
        for item, (chosen, rejected) in zip(scored, logps):
            item.ref_chosen, item.ref_rejected = chosen, rejected
    return scored
