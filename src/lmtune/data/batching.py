"""Rows -> padded tensors, and the seeded order in which rows become micro-batches."""

from __future__ import annotations

import math

import torch

from lmtune.data.encode import IGNORE_INDEX, EncodedRow


def collate(rows: list[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Labels were built before padding, so padding with an id equal to
    EOS can never mask a real EOS label: padded label positions are always -100."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """A permutation that depends only on (seed, epoch), so a resumed run replays the same order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()


def micro_batches(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = epoch_order(n_rows, seed, epoch)
    return [order[i: i + batch_size] for i in range(0, n_rows, batch_size)]


def steps_per_epoch(n_rows: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass; a last, shorter window still makes a step."""
    return math.ceil(math.ceil(n_rows / batch_size) / accumulation)
