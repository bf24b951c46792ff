"""Encoded rows cached on disk, per dataset, keyed by everything that decides them.

The key hashes the dataset's parsed records (so file content, columns, sampling and data_vars all
count), the tokenizer (vocabulary, special tokens, chat template, stop ids) and the encoding settings
(cutoff_len, cutoff_policy, masking options). A hit skips tokenization; `overwrite_cache: true`
rebuilds. Files are safetensors (flat int32 arrays plus offsets), never pickles, written to a
temporary name and renamed, so a crash leaves no half-written entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from transformers import PreTrainedTokenizerBase

from lmtune.durable import WriteError, write_with, writing
from lmtune.data.encode import EncodedRow, KTORow, PreferenceRow, Result
from lmtune.data.formats import Record

# Bump when encoding changes what it produces for the same inputs, so old entries stop matching.
CACHE_VERSION = 1
ROW_TYPES = {cls.__name__: cls for cls in (EncodedRow, PreferenceRow, KTORow)}
STATUSES = ("kept", "truncated", "over_long", "no_target")


def cache_dir() -> Path:
    from lmtune.models.load import cache_root

    return cache_root() / "data"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> str:
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.chat_template, sorted(stop_ids),
                              sorted(tokenizer.special_tokens_map.items(), key=str)],
                             default=str).encode())
    return digest.hexdigest()


def records_fingerprint(records: list[Record]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(type(record).__name__.encode())
        digest.update(json.dumps(dataclasses.asdict(record), ensure_ascii=False).encode())
    return digest.hexdigest()


def cache_key(records: list[Record], tokenizer_fp: str, settings: dict[str, Any]) -> str:
    payload = json.dumps({"version": CACHE_VERSION, "records": records_fingerprint(records),
                          "tokenizer": tokenizer_fp, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _arrays(rows: list[Any]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    if not rows:
        return arrays
    for f in dataclasses.fields(type(rows[0])):
        values = [getattr(row, f.name) for row in rows]
        if all(v is None for v in values):
            continue
        if isinstance(values[0], bool):
            arrays[f.name] = np.array(values, dtype=np.int8)
            continue
        arrays[f.name] = np.fromiter(chain.from_iterable(values), dtype=np.int32)
        arrays[f.name + ".offsets"] = np.cumsum([0] + [len(v) for v in values], dtype=np.int64)
    return arrays


def _rows(arrays: dict[str, np.ndarray], cls: type, n: int) -> list[Any]:
    columns: dict[str, list[Any]] = {}
    for f in dataclasses.fields(cls):
        if f.name not in arrays:
            columns[f.name] = [None] * n
        elif f.name + ".offsets" in arrays:
            flat, offsets = arrays[f.name].tolist(), arrays[f.name + ".offsets"].tolist()
            columns[f.name] = [flat[a:b] for a, b in zip(offsets, offsets[1:])]
        else:
            columns[f.name] = [bool(v) for v in arrays[f.name].tolist()]
    return [cls(**{name: values[i] for name, values in columns.items()}) for i in range(n)]


def to_arrays(results: list[Result]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Results as flat int32 arrays plus offsets (and their metadata): what the cache file holds,
    and what worker processes send back, since arrays pickle at memory speed and lists of ints do
    not."""
    rows = [row for row, _ in results if row is not None]
    arrays = _arrays(rows)
    arrays["status"] = np.array([STATUSES.index(s) for _, s in results], dtype=np.int8)
    meta = {"row_type": type(rows[0]).__name__ if rows else "", "rows": str(len(rows)),
            "version": str(CACHE_VERSION)}
    return arrays, meta


def from_arrays(arrays: dict[str, np.ndarray], meta: dict[str, str]) -> list[Result]:
    arrays = dict(arrays)
    statuses = [STATUSES[s] for s in arrays.pop("status").tolist()]
    rows = iter(_rows(arrays, ROW_TYPES[meta["row_type"]], int(meta["rows"]))
                if meta["row_type"] else [])
    return [(next(rows) if s in ("kept", "truncated") else None, s) for s in statuses]


def load(key: str) -> list[Result] | None:
    """The cached results of one dataset, or None when there is no (readable) entry."""
    path = cache_dir() / f"{key}.safetensors"
    try:
        with safe_open(path, framework="np") as handle:
            meta = handle.metadata()
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError):
        return None
    return from_arrays(arrays, meta)


def save(key: str, results: list[Result]) -> bool:
    """Store one dataset's results; False (with one warning line) when the cache cannot be written:
    the cache only saves time, so a read-only or full disk never stops a run."""
    arrays, meta = to_arrays(results)
    folder = cache_dir()
    path = folder / f"{key}.safetensors"
    try:
        with writing("the encoded-data cache", path, "Training goes on without the cache."):
            folder.mkdir(parents=True, exist_ok=True)
        write_with(path, lambda tmp: save_file(arrays, tmp, metadata=meta), "the encoded-data cache",
                   "Training goes on without the cache.")
    except WriteError as exc:
        print(f"warning: {exc.message}\n  (set LMTUNE_HOME to a writable folder to cache encoded data)")
        return False
    return True
