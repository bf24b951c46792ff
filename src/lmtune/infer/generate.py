"""Batched generation with a KV cache, per-row settings and per-row streaming.

Rows are left-padded into one batch; each step runs one forward pass for every row still going.
Each row has its own sampling settings (greedy at temperature 0, else temperature, top-p and top-k
with its own seeded generator, so a seeded row gives the same tokens whatever it is batched with),
its own stop ids and token budget, and a callback that receives each new token and may end the row.
A row that ends (stop id, budget, or its callback said so) leaves the batch: its KV cache rows are
dropped, so a finished or abandoned request costs nothing afterwards.

Shared by the server's scheduler, and written so that chat and batch prediction can use it too.
Virtual tokens of prompt-learning adapters enter as `prefix` (prefix tuning: a pre-filled KV cache)
or `prompt_embeds` (prompt tuning and p-tuning: embeddings in front of the text), placed as peft's
training forward places them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

# Called with (row index, new token id); returning False ends the row after this token.
OnToken = Callable[[int, int], bool]

STOP, LENGTH, ENDED = "stop", "length", "ended"


@dataclass
class Sampling:
    """How one row picks its tokens. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class GenRow:
    prompt_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()
    adapter: str | None = None  # peft mixed-batch adapter name; "__base__" for the base model


@dataclass
class GenResult:
    tokens: list[int]
    finish_reason: str  # stop (an end-of-turn id), length (budget spent), ended (by the callback)


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature <= 0 or generator is None:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the most likely token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature <= 0:
        return None
    seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**63)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def generate(model: torch.nn.Module, rows: list[GenRow], pad_id: int, on_token: OnToken | None = None,
             prefix: DynamicCache | None = None, prompt_embeds: torch.Tensor | None = None,
             mixed_adapters: bool = False) -> list[GenResult]:
    """Generate for every row at once; returns each row's new tokens and why it ended.

    `prefix` (batch rows, as from peft's get_prompt) or `prompt_embeds` ([n, hidden]) put the same
    virtual tokens before every row. With `mixed_adapters`, each row runs its own `adapter`
    through peft's mixed-batch forward (LoRA only)."""
    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                        device=device)
    n_virtual = prefix.get_seq_length() if prefix is not None else (
        prompt_embeds.shape[0] if prompt_embeds is not None else 0)
    if n_virtual:
        mask = torch.cat([mask.new_ones(len(rows), n_virtual), mask], dim=1)
    # Positions count real tokens only, so a left-padded row sees the positions it would alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs: dict = {"input_ids": ids}
    if prompt_embeds is not None:
        text = model.get_input_embeddings()(ids)
        virtual = prompt_embeds.to(text.dtype).unsqueeze(0).expand(len(rows), -1, -1)
        inputs = {"inputs_embeds": torch.cat([virtual, text], dim=1)}
    else:
        positions = positions[:, n_virtual:]
    cache = prefix if prefix is not None else DynamicCache()
    extra = {"adapter_names": [r.adapter or "__base__" for r in rows]} if mixed_adapters else {}

    results = [GenResult([], LENGTH) for _ in rows]
    generators = [_generator(r.sampling) for r in rows]
    live = list(range(len(rows)))  # original indices of the rows still in the batch
    while live:
        logits = model(**inputs, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1, **extra).logits[:, -1]
        keep, next_ids = [], []
        for slot, index in enumerate(live):
            row, result = rows[index], results[index]
            token = _pick(logits[slot], row.sampling, generators[index])
            result.tokens.append(token)
            going = on_token(index, token) if on_token is not None else True
            if token in row.stop_ids:
                result.finish_reason = STOP
            elif not going:
                result.finish_reason = ENDED
            elif len(result.tokens) < row.sampling.max_new_tokens:
                keep.append(slot)
                next_ids.append(token)
        if not keep:
            break
        if len(keep) < len(live):
            chosen = torch.tensor(keep, device=device)
            cache.batch_select_indices(chosen)
            mask, positions = mask[chosen], positions[chosen]
            if extra:
                extra["adapter_names"] = [extra["adapter_names"][s] for s in keep]
            live = [live[s] for s in keep]
        inputs = {"input_ids": torch.tensor(next_ids, device=device).unsqueeze(1)}
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return results
