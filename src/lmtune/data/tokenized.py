"""tokenized_path (LLaMA-Factory's key): the encoded train and val rows of a run saved in a folder
of their own, and read back by later runs instead of the data files.

The folder holds train.safetensors and val.safetensors in the encoded-data cache's format (cache.py)
and tokenized.json, written last, which says what encoded them: the stage's kind of rows, the
tokenizer's fingerprint (vocabulary, added tokens, chat template, stop ids) and the encoding
settings. A run whose tokenizer or settings differ is refused with the difference, since its rows
would not be what it asks for; the data keys (dataset, max_samples, val_size, mixing) are not read
again, as in LLaMA-Factory: the rows are the split the first run made.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lmtune.data import cache
from lmtune.data.encode import Row
from lmtune.errors import DataError

MANIFEST = "tokenized.json"
FORMAT = "lmtune encoded rows"


def manifest(path: str | None) -> dict[str, Any] | None:
    """What encoded the rows saved at `path`; None when nothing is saved there yet. A folder that
    holds something else (LLaMA-Factory's own arrow files, say) is refused, never overwritten."""
    if not path:
        return None
    folder = Path(path).expanduser()
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return None
    try:
        saved = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise DataError(f"tokenized_path: {path} is not empty and holds no rows saved by lmtune "
                        f"(no valid {MANIFEST}; LLaMA-Factory's arrow files are not read).",
                        "point tokenized_path to a new folder: the first run saves its encoded "
                        "rows there, later runs train from them.")
    return saved


def _rows(folder: Path, split: str) -> list[Row]:
    file = folder / f"{split}.safetensors"
    try:
        with safe_open(file, framework="np") as handle:
            meta = handle.metadata()
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise DataError(f"tokenized_path: {file} cannot be read ({exc}).",
                        "delete the folder to encode the data again.") from None
    return [row for row, _ in cache.from_arrays(arrays, meta) if row is not None]


def load(path: str, kind: str, tokenizer_fp: str, settings: dict[str, Any]) -> tuple[list[Row], list[Row], dict] | None:
    """The saved (train, val) rows and their manifest, or None when none are saved yet."""
    saved = manifest(path)
    if saved is None:
        return None
    if saved.get("version") != cache.CACHE_VERSION:
        raise DataError(f"tokenized_path: {path} was written by another version of lmtune's "
                        "encoder.", "delete the folder (or choose another) to encode the data again.")
    if saved["kind"] != kind:
        raise DataError(f"tokenized_path: {path} holds {saved['kind']} rows, but this stage trains "
                        f"on {kind} rows.", "use the stage that saved them, or another folder.")
    if saved["tokenizer"] != tokenizer_fp:
        raise DataError(f"tokenized_path: {path} was encoded by another tokenizer (its vocabulary, "
                        "added tokens, chat template or stop tokens differ from this run's).",
                        "use the model, template and add_tokens it was saved with, or another "
                        "folder.")
    changed = {k: (saved["settings"].get(k), v) for k, v in settings.items()
               if saved["settings"].get(k) != v}
    if changed:
        details = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise DataError(f"tokenized_path: {path} was encoded with other settings ({details}).",
                        "restore those keys, or choose another folder to encode afresh.")
    folder = Path(path).expanduser()
    return _rows(folder, "train"), _rows(folder, "val"), saved


def save(path: str, train: list[Row], val: list[Row], kind: str, tokenizer_fp: str,
         settings: dict[str, Any], datasets: list[str], data_fp: str,
         val_groups: list[tuple[str, int]]) -> None:
    """Write the rows to a staging folder and move it into place, so a crash leaves nothing half
    written; another process that saved first wins."""
    folder = Path(path).expanduser()
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        staging.mkdir(parents=True)
        for split, rows in (("train", train), ("val", val)):
            arrays, meta = cache.to_arrays([(row, "kept") for row in rows])
            save_file(arrays, str(staging / f"{split}.safetensors"), metadata=meta)
        (staging / MANIFEST).write_text(json.dumps(
            {"format": FORMAT, "version": cache.CACHE_VERSION, "kind": kind,
             "tokenizer": tokenizer_fp, "settings": settings, "datasets": datasets,
             "data_fingerprint": data_fp, "rows": {"train": len(train), "val": len(val)},
             "val_groups": val_groups},
            indent=2), encoding="utf-8")
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if folder.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"tokenized_path: cannot write {path} ({exc.strerror or exc}).",
                        "choose a folder you can write, or remove tokenized_path.") from None
    print(f"encoded rows saved at tokenized_path {path}; later runs with it train from them")
