"""Forward passes the stages share: logits only where a label trains (chunk by chunk where the head
allows, train/head_loss.py), the summed token loss, and each reply's log-probability. sft and pt
train on the token loss; rm, dpo and kto compare replies by their log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel

from lmtune.data.batching import model_inputs
from lmtune.data.encode import IGNORE_INDEX
from lmtune.train.head_loss import Head, linear_head, summed_loss, token_logps

Batch = dict[str, torch.Tensor]


def _at_targets(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.nn.Module | None]:
    """(x, labels, head) at the positions whose next token trains: x their hidden states and head
    the output head that turns them into logits, or x the logits themselves and head None.

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
        return logits[:, :-1][mask], labels[mask], None
    hidden = base.get_decoder()(**inputs).last_hidden_state
    return hidden[:, :-1][mask], labels[mask], base.get_output_embeddings()


def _chunked_head(head: torch.nn.Module | None, hidden: torch.Tensor, chunked: bool) -> Head | None:
    return linear_head(head, hidden) if chunked and head is not None else None


def target_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) at the positions whose next token trains."""
    x, labels, head = _at_targets(model, batch)
    return (head(x) if head is not None else x), labels


def token_loss_and_hits(model: torch.nn.Module, batch: Batch,
                        chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy summed over every target token of the batch, how many of them the model ranks
    first). chunked: the head and loss run a chunk of positions at a time (train/head_loss.py)."""
    x, labels, head = _at_targets(model, batch)
    if (fused := _chunked_head(head, x, chunked)) is not None:
        return summed_loss(fused, x, labels)
    logits = head(x) if head is not None else x
    return F.cross_entropy(logits.float(), labels, reduction="sum"), (logits.argmax(-1) == labels).sum()


def token_loss_sum(model: torch.nn.Module, batch: Batch, chunked: bool = True) -> torch.Tensor:
    """Cross-entropy summed over every target token of the batch."""
    return token_loss_and_hits(model, batch, chunked)[0]


def count_targets(batch: Batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def response_logps(model: torch.nn.Module, batch: Batch,
                   chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of log p of its target tokens, number of target tokens). chunked: as in
    token_loss_and_hits."""
    x, labels, head = _at_targets(model, batch)  # only at target positions, flattened
    if (fused := _chunked_head(head, x, chunked)) is not None:
        logps = token_logps(fused, x, labels)
    else:
        logps = -F.cross_entropy((head(x) if head is not None else x).float(), labels, reduction="none")
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    row_of_token = mask.nonzero()[:, 0]  # same row-major order as _at_targets' selection
    sums = torch.zeros(len(mask), dtype=logps.dtype, device=logps.device)
    return sums.index_add(0, row_of_token, logps), mask.sum(-1)
