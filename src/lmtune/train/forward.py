"""Forward passes the stages share: logits only where a label trains, the summed token loss, and each
reply's log-probability. sft and pt train on the token loss; rm, dpo and kto compare replies by
their log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel

from lmtune.data.batching import model_inputs
from lmtune.data.encode import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


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
    """Cross-entropy summed over every target token of the batch."""
    logits, labels = target_logits(model, batch)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def count_targets(batch: Batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def response_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of log p of its target tokens, number of target tokens)."""
    logits, labels = target_logits(model, batch)  # only at target positions, flattened
    token_logps = -F.cross_entropy(logits.float(), labels, reduction="none")
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    row_of_token = mask.nonzero()[:, 0]  # same row-major order as target_logits' selection
    sums = torch.zeros(len(mask), dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, row_of_token, token_logps), mask.sum(-1)
