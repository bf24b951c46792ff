"""Rows -> padded tensors, contamination-free packing, and the seeded order of micro-batches.

Packing puts several samples in one row of at most cutoff_len tokens. Their position ids restart at 0
for every sample, and the model is called with those position ids, no 2-D attention mask and no KV
cache: transformers then builds a block-diagonal causal mask (varlen attention with flash kernels),
so no sample attends to another. `check_packing_isolation` proves it for the architecture at hand
before a packed run, since a model that ignored the position ids would mix samples silently.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import TypeVar

import torch

from lmtune.data.encode import IGNORE_INDEX, EncodedRow
from lmtune.errors import ConfigError

T = TypeVar("T")


def collate(rows: list[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Labels were built before padding, so padding with an id equal to
    EOS can never mask a real EOS label: padded label positions are always -100.

    A batch holding packed rows also gets `position_ids`; padding then counts from 0 as a sample of
    its own, so real tokens never see it either."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    packed = any(r.position_ids is not None for r in rows)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
        if position_ids is not None:
            position_ids[i, :n] = torch.tensor(row.position_ids or range(n))
            position_ids[i, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """Keyword arguments for the model's forward. Packed batches pass position ids instead of the
    padding mask; transformers isolates their samples only without a 2-D mask and without a cache."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "use_cache": False}


# --- packing --------------------------------------------------------------------------------------

def _join(samples: list[EncodedRow]) -> EncodedRow:
    ids, labels, positions = [], [], []
    for sample in samples:
        ids += sample.input_ids
        # A sample's first token would be "predicted" from the previous sample's last one: never
        # trained, as it is not when the sample stands alone.
        labels += [IGNORE_INDEX] + sample.labels[1:]
        positions += range(len(sample.input_ids))
    return EncodedRow(ids, labels, positions)


def pack_rows(rows: list[EncodedRow], capacity: int) -> list[EncodedRow]:
    """Best-fit decreasing: longest rows first, each into the fullest row it still fits."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin), sorted: bisect finds the tightest fit
    for i in order:
        size = len(rows[i].input_ids)
        at = bisect_left(free, (size, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - size > 0:
            insort(free, (space - size, b))
    return [_join([rows[i] for i in b]) for b in bins]


def pack_documents(rows: list[EncodedRow], capacity: int) -> list[EncodedRow]:
    """pt: documents one after another, cut into rows of `capacity` tokens; a document longer than
    the space left continues (from position 0) in the next row. Nothing is dropped."""
    return list(iter_pack_documents(rows, capacity))


def iter_pack_documents(rows: Iterable[EncodedRow], capacity: int) -> Iterator[EncodedRow]:
    """pack_documents, a row at a time (streaming packs as documents arrive)."""
    current: list[EncodedRow] = []
    used = 0
    for row in rows:
        start = 0
        while start < len(row.input_ids):
            take = min(capacity - used, len(row.input_ids) - start)
            current.append(EncodedRow(row.input_ids[start: start + take],
                                      row.labels[start: start + take]))
            used += take
            start += take
            if used == capacity:
                yield _join(current)
                current, used = [], 0
    if current:
        yield _join(current)


@lru_cache(maxsize=None)
def _packing_leak(config_json: str, attn_implementation: str | None) -> float:
    """Largest logit difference between two samples run packed and run alone, on a 1-layer random
    model of the same architecture and attention implementation (cached per pair)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads(config_json)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    small = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
    for key, value in small.items():
        if hasattr(config, key):
            setattr(config, key, value)
    # The run's random state (weights init, LoRA init, dropout) must not notice this check.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    a, b = list(range(3, 14)), list(range(20, 27))
    packed = collate([_join([EncodedRow(a, a), EncodedRow(b, b)])], pad_id=0)
    with torch.no_grad():
        together = model(**model_inputs(packed)).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits[0] for ids in (a, b)])
    return float((together - alone).abs().max())


def check_packing_isolation(config) -> None:
    """Refuse packing for a model whose attention would let packed samples see each other."""
    values = config.to_diff_dict() | {"model_type": config.model_type}
    values.pop("quantization_config", None)  # the check model is small and unquantized
    # ... and fp32: a bf16-stored base records its dtype in the config, and bf16 rounding would
    # read as a leak. The check is about the attention mask, not precision.
    for key in ("dtype", "torch_dtype"):
        values.pop(key, None)
    implementation = getattr(config, "_attn_implementation", None)
    try:
        leak = _packing_leak(json.dumps(values, sort_keys=True, default=str), implementation)
    except Exception as exc:  # an architecture that cannot be shrunk to a test model
        raise ConfigError(f"packing: lmtune could not check that {config.model_type} keeps packed "
                          f"samples apart ({type(exc).__name__}: {str(exc).splitlines()[0]}).",
                          "set packing: false.") from None
    if leak > 1e-3:
        raise ConfigError(f"packing: {config.model_type} with attention '{implementation}' lets packed "
                          f"samples attend to each other (logits differ by {leak:.2g}).",
                          "set packing: false.")


# --- order ----------------------------------------------------------------------------------------

def row_length(row: EncodedRow) -> int:
    return len(row.input_ids)


def group_by_length(window: list[list[T]], length: Callable[[T], int] = row_length) -> list[list[T]]:
    """The rows of a step's micro-batches (all ranks') regrouped, shortest together by `length`
    (what a row pads its batch to), into micro-batches of the same sizes.

    For a loss summed row by row and normalised over the whole window, which micro-batch a row
    joins changes no number; a batch is padded to its longest row, so rows of like length waste
    less. The grouping is a pure function of the window, so a resumed run and a run on any number
    of processes (ranks take every world-size-th micro-batch) train the same micro-batches."""
    ordered = sorted((row for rows in window for row in rows), key=length)
    regrouped, start = [], 0
    for rows in window:
        regrouped.append(ordered[start: start + len(rows)])
        start += len(rows)
    return regrouped


def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """A permutation that depends only on (seed, epoch), so a resumed run replays the same order;
    without `shuffle`, the rows in the order the data gave them."""
    if not shuffle:
        return list(range(n_rows))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()


def micro_batches(n_rows: int, batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True) -> list[list[int]]:
    order = epoch_order(n_rows, seed, epoch, shuffle)
    return [order[i: i + batch_size] for i in range(0, n_rows, batch_size)]


def steps_per_epoch(n_rows: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass; a last, shorter window still makes a step."""
    return math.ceil(math.ceil(n_rows / batch_size) / accumulation)
