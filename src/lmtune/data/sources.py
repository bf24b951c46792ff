"""Find datasets (dataset_info.json names or file paths), read their records, sample and split them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lmtune.config import RunConfig
from lmtune.data.formats import (PARSERS, Conversation, DatasetAttr, RecordError, check_turn_order,
                                 fill_placeholders, guess_formatting)
from lmtune.data.report import DataReport, DatasetCounts
from lmtune.errors import DataError

READABLE = (".json", ".jsonl")


def _is_file(path: Path) -> bool:
    # Path.is_file() raises, rather than answering False, for a name longer than the OS allows.
    try:
        return path.is_file()
    except OSError:
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})",
                        "save the file as UTF-8.", file=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot be read: {exc.strerror or exc}", "check the file and its permissions.",
                        file=str(path)) from None


# Valid JSON that Python's json module still refuses, with ValueError or RecursionError rather than
# JSONDecodeError: an integer over the 4300-digit limit, or arrays/objects nested past the stack.
_JSON_LIMITS = (ValueError, RecursionError)


def _json_limit(exc: Exception) -> tuple[str, str]:
    """(what went wrong, fix) for an error in _JSON_LIMITS that is not a JSONDecodeError."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to read", "flatten the nesting."
    return f"cannot be read: {str(exc).split(';')[0]}", "write very long numbers as strings."


def read_dataset_info(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / "dataset_info.json"
    if not _is_file(path):
        return {}
    try:
        info = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON (line {exc.lineno}): {exc.msg}", "fix the JSON syntax.",
                        file=str(path)) from None
    except _JSON_LIMITS as exc:
        raise DataError(*_json_limit(exc), file=str(path)) from None
    if not isinstance(info, dict):
        raise DataError("must map dataset names to entries",
                        'write e.g. {"my_data": {"file_name": "my_data.json"}}.', file=str(path))
    return info


def resolve_dataset(name: str, dataset_dir: Path, info: dict[str, Any]) -> DatasetAttr:
    """A name from `dataset:` -> its attributes: a dataset_info.json entry, or a file path."""
    if name in info:
        entry = info[name]
        where = str(dataset_dir / "dataset_info.json")
        if not isinstance(entry, dict):
            raise DataError(f"entry '{name}' must be an object",
                            f'write e.g. "{name}": {{"file_name": "{name}.json"}}.', file=where)
        if "file_name" not in entry:
            remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if k in entry]
            raise DataError(f"entry '{name}' has no file_name"
                            + (f" ({remote[0]} needs the network; lmtune runs offline)" if remote else ""),
                            "download the data and set file_name to the local file.", file=where)
        if not isinstance(entry["file_name"], str):
            raise DataError(f"entry '{name}' has file_name {entry['file_name']!r}, which is not a "
                            "file name.", "set file_name to the data file, e.g. \"my_data.json\".",
                            file=where)
        formatting = entry.get("formatting", "alpaca")
        if not isinstance(formatting, str) or formatting not in PARSERS:
            raise DataError(f"entry '{name}' has formatting '{formatting}'",
                            f"use one of: {', '.join(PARSERS)}.", file=where)
        if entry.get("ranking"):
            raise DataError(f"entry '{name}' is preference data (ranking: true), which stage sft "
                            "cannot train on.", "use an SFT dataset.", file=where)
        # columns and tags are looked up and compared by name: anything but text->text would fail
        # later, record by record, with an error that no longer points at this entry.
        for group, example in (("columns", '{"prompt": "question", "response": "answer"}'),
                               ("tags", '{"role_tag": "from", "user_tag": "human"}')):
            value = entry.get(group) or {}
            if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                raise DataError(f"entry '{name}' has {group} {value!r}; it must map names to text.",
                                f"write e.g. \"{group}\": {example}.", file=where)
        path = dataset_dir / entry["file_name"]
        return DatasetAttr(name=name, file_name=str(path), formatting=formatting,
                           columns=entry.get("columns") or {}, tags=entry.get("tags") or {})
    for candidate in (Path(name), dataset_dir / name):
        if _is_file(candidate):
            return DatasetAttr(name=name, file_name=str(candidate), formatting="")
    known = ", ".join(sorted(info)) or "none"
    raise DataError(f"dataset '{name}' is neither an entry of {dataset_dir / 'dataset_info.json'} nor "
                    "a file.", f"use a registered name (known: {known}) or a path to a .json/.jsonl file.")


def read_records(path: Path) -> list[Any]:
    if not _is_file(path):
        raise DataError("file not found", "check file_name in dataset_info.json or the path in "
                        "dataset:.", file=str(path))
    if path.suffix not in READABLE:
        raise DataError(f"unsupported file type '{path.suffix}'", "use .json or .jsonl.", file=str(path))
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}",
                            "fix the JSON syntax.", file=str(path)) from None
        except _JSON_LIMITS as exc:
            raise DataError(*_json_limit(exc), file=str(path)) from None
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"line {number} is not valid JSON: {exc.msg}",
                                "write one JSON object per line (JSON Lines) or one JSON list.",
                                file=str(path)) from None
            except _JSON_LIMITS as exc:
                problem, fix = _json_limit(exc)
                raise DataError(f"line {number}: {problem}", fix, file=str(path)) from None
    return records


def load_dataset_records(attr: DatasetAttr, cfg: RunConfig, counts: DatasetCounts) -> list[Conversation]:
    path = Path(attr.file_name)
    records = read_records(path)
    counts.found = len(records)
    if cfg.max_samples is not None and len(records) > cfg.max_samples:
        counts.dropped_by_max_samples = len(records) - cfg.max_samples
        records = records[: cfg.max_samples]  # the first N, as LLaMA-Factory users expect
    if not records:
        raise DataError("the file holds no records", "add records, or remove the dataset from "
                        "dataset:.", file=str(path))
    if not attr.formatting:
        try:
            attr.formatting = guess_formatting(records[0])
        except RecordError as exc:
            raise DataError(f"record 0: {exc}", "register the file in dataset_info.json with its "
                            "formatting and columns.", file=str(path)) from None
    parse = PARSERS[attr.formatting]
    conversations, missing = [], set()
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise RecordError(f"expected an object, got {type(record).__name__}")
            conv = parse(record, attr)
            missing |= fill_placeholders(conv, cfg.data_vars)
            check_turn_order(conv)
        except RecordError as exc:
            raise DataError(f"{exc} ({attr.formatting} format)",
                            "fix the record, or check columns/tags in dataset_info.json.",
                            file=str(path), record=index) from None
        conversations.append(conv)
    counts.kept = len(conversations)
    counts.unfilled_placeholders = sorted(missing)
    return conversations


def load_conversations(cfg: RunConfig) -> tuple[list[Conversation], DataReport]:
    """Every dataset of `cfg.dataset`, in order, after max_samples; with the counts."""
    dataset_dir = Path(cfg.dataset_dir)
    info = read_dataset_info(dataset_dir)
    report = DataReport(cutoff_len=cfg.cutoff_len, max_samples=cfg.max_samples)
    conversations: list[Conversation] = []
    for name in cfg.dataset_names:
        attr = resolve_dataset(name, dataset_dir, info)
        counts = DatasetCounts(name=name, file=attr.file_name)
        report.datasets.append(counts)
        conversations += load_dataset_records(attr, cfg, counts)
    return conversations, report


def split_validation(items: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded shuffle, then `val_size` (fraction < 1 or row count) rows go to validation."""
    if val_size <= 0:
        return items, []
    n_val = int(val_size) if val_size >= 1 else max(1, round(val_size * len(items)))
    if n_val >= len(items):
        raise DataError(f"val_size={val_size} asks for {n_val} validation rows but there are only "
                        f"{len(items)} rows.", "lower val_size.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [x for i, x in enumerate(items) if i not in val_idx]
    val = [x for i, x in enumerate(items) if i in val_idx]
    return train, val
