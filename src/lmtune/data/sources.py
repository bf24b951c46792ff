"""Find datasets (dataset_info.json names, files, folders, saved or hub datasets), read their records,
sample them (num_samples, max_samples), parse them into canonical records, and split off validation.

Files are read lazily where the format allows: JSON Lines, CSV and text are split into records
without parsing them, and Arrow tables are only sliced, so `max_samples: 1000` on a file of 260,000
records parses 1,000 of them while the report still counts all 260,000.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmtune.config import RunConfig
from lmtune.data.formats import (PARSERS, STAGE_KINDS, DatasetAttr, Kind, Record, RecordError,
                                 fill_placeholders, guess_formatting, parse_record)
from lmtune.data.report import DataReport, DatasetCounts
from lmtune.errors import DataError
from lmtune.hub import how_to_get, hub_access, why_offline

# File types by suffix, as LLaMA-Factory's FILEEXT2TYPE. A folder holds files of one type.
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
              ".arrow": "arrow"}
BAD_SHOWN = 5  # bad records listed in an error or the report


def _is_file(path: Path) -> bool:
    # Path.is_file() raises, rather than answering False, for a name longer than the OS allows.
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
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


# --- files -> records -----------------------------------------------------------------------------

class RecordFile:
    """The records of one file: `len` counts them, `take` returns the chosen ones (parsed)."""

    def __init__(self, path: Path, items: Sequence[Any]):
        self.path = path
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def take(self, indices: Sequence[int]) -> list[Any]:
        return [self.items[i] for i in indices]


class UnreadableRecord:
    """A record whose text is not valid JSON: a bad record like any other, so skip_bad_records
    skips it and the error names it."""

    def __init__(self, reason: str):
        self.reason = reason


class JsonLinesFile(RecordFile):
    """One JSON value per non-blank line; a line is parsed only when its record is taken."""

    def __init__(self, path: Path, text: str):
        # Lines end at \n only (JSON Lines): str.splitlines would also split at U+2028, U+0085 and
        # other characters that JSON strings may hold unescaped.
        lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
        super().__init__(path, lines)

    def take(self, indices: Sequence[int]) -> list[Any]:
        records: list[Any] = []
        for i in indices:
            number, line = self.items[i]
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                records.append(UnreadableRecord(f"line {number} is not valid JSON: {exc.msg} "
                                                "(write one JSON object per line)"))
            except _JSON_LIMITS as exc:
                records.append(UnreadableRecord(f"line {number}: {' '.join(_json_limit(exc))}"))
        return records


class TableFile(RecordFile):
    """An Arrow table (parquet, arrow, saved or hub datasets): rows are converted when taken."""

    def __init__(self, path: Path, table: Any):
        super().__init__(path, [])
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def take(self, indices: Sequence[int]) -> list[Any]:
        import pyarrow

        if isinstance(self.table, pyarrow.Table):
            return self.table.take(list(indices)).to_pylist()
        return self.table.select(list(indices)).to_list()  # a datasets.Dataset


def _json_file(path: Path) -> RecordFile:
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}",
                            "fix the JSON syntax.", file=str(path)) from None
        except _JSON_LIMITS as exc:
            raise DataError(*_json_limit(exc), file=str(path)) from None
        return RecordFile(path, records)
    return JsonLinesFile(path, text)


def _csv_file(path: Path) -> RecordFile:
    try:
        rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    except csv.Error as exc:
        raise DataError(f"not valid CSV: {exc}", "write a header row, then one record per row.",
                        file=str(path)) from None
    return RecordFile(path, rows)


def _text_file(path: Path) -> RecordFile:
    # One document per non-blank line, as the `text` loader of the datasets library reads .txt.
    return RecordFile(path, [{"text": line} for line in _read_text(path).splitlines() if line.strip()])


def _arrow_table(path: Path, kind: str) -> Any:
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet

    try:
        if kind == "parquet":
            return pyarrow.parquet.read_table(path)
        try:  # the datasets library writes the streaming format; others write the file format
            with pyarrow.ipc.open_stream(path) as reader:
                return reader.read_all()
        except pyarrow.ArrowInvalid:
            with pyarrow.ipc.open_file(path) as reader:
                return reader.read_all()
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"cannot be read as {kind}: {str(exc).splitlines()[0]}",
                        f"check that it is a complete .{kind} file.", file=str(path)) from None


def open_file(path: Path) -> RecordFile:
    kind = FILE_TYPES.get(path.suffix)
    if kind is None:
        raise DataError(f"unsupported file type '{path.suffix}'",
                        f"use one of: {', '.join(FILE_TYPES)}.", file=str(path))
    if kind == "json":
        return _json_file(path)
    if kind == "csv":
        return _csv_file(path)
    if kind == "text":
        return _text_file(path)
    return TableFile(path, _arrow_table(path, kind))


class Source:
    """The records of one dataset, over one or more files; global index <-> (file, index)."""

    def __init__(self, files: list[RecordFile], text_only: bool = False):
        self.files = files
        self.text_only = text_only  # .txt: plain documents, usable only by stage pt
        self.starts = [0]
        for f in files:
            self.starts.append(self.starts[-1] + len(f))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[str, int]:
        for f, start, end in zip(self.files, self.starts, self.starts[1:]):
            if index < end:
                return str(f.path), index - start
        raise IndexError(index)

    def take(self, indices: Sequence[int]) -> list[Any]:
        per_file: dict[int, list[tuple[int, int]]] = {}
        for position, index in enumerate(indices):
            f = next(k for k, end in enumerate(self.starts[1:]) if index < end)
            per_file.setdefault(f, []).append((position, index - self.starts[f]))
        out: list[Any] = [None] * len(indices)
        for f, wanted in per_file.items():
            for (position, _), record in zip(wanted, self.files[f].take([i for _, i in wanted])):
                out[position] = record
        return out


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if _is_file(p) and p.suffix in FILE_TYPES)
    if not files:
        raise DataError(f"the folder holds no data files ({', '.join(FILE_TYPES)})",
                        "put the dataset's files in it, or point file_name to a file.", file=str(folder))
    kinds = {FILE_TYPES[p.suffix] for p in files}
    if len(kinds) > 1:
        raise DataError(f"the folder mixes file types ({', '.join(sorted(kinds))})",
                        "keep files of one type in a dataset folder.", file=str(folder))
    return files


def _saved_dataset(folder: Path, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # the datasets library raises many types for a damaged folder
        raise DataError(f"cannot be read as a saved dataset: {str(exc).splitlines()[0]}",
                        "save it again with Dataset.save_to_disk.", file=str(folder)) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"the saved dataset has no split '{split}' (it has "
                            f"{', '.join(loaded)})", "set split in dataset_info.json.", file=str(folder))
        loaded = loaded[split]
    return loaded


def _hub_dataset(attr: DatasetAttr) -> Any:
    import datasets

    with hub_access() as online:
        try:
            return datasets.load_dataset(attr.hf_hub_url, name=attr.subset, split=attr.split)
        except Exception as exc:  # offline, unknown repo, missing split: all end the same way
            where = "the Hugging Face hub" if online else f"the local cache ({why_offline()})"
            raise DataError(f"dataset '{attr.name}': cannot load hf_hub_url {attr.hf_hub_url} from "
                            f"{where}: {str(exc).splitlines()[0]}",
                            how_to_get(attr.hf_hub_url, "dataset").removesuffix(".")
                            + "; or download the files and set file_name to them.",
                            file=attr.info_file) from None


def open_source(attr: DatasetAttr) -> Source:
    if not attr.file_name:
        data = _hub_dataset(attr)
        return Source([TableFile(Path(attr.hf_hub_url or attr.name), data)])
    path = Path(attr.file_name)
    if _is_dir(path):
        if _is_file(path / "state.json") or _is_file(path / "dataset_dict.json"):
            return Source([TableFile(path, _saved_dataset(path, attr.split))])
        files = _folder_files(path)
        return Source([open_file(p) for p in files], text_only=files[0].suffix == ".txt")
    if not _is_file(path):
        raise DataError("file not found", "check file_name in dataset_info.json or the path in "
                        "dataset:.", file=str(path))
    return Source([open_file(path)], text_only=path.suffix == ".txt")


# --- dataset_info.json ----------------------------------------------------------------------------

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


def _entry_attr(name: str, entry: Any, dataset_dir: Path) -> DatasetAttr:
    where = str(dataset_dir / "dataset_info.json")
    if not isinstance(entry, dict):
        raise DataError(f"entry '{name}' must be an object",
                        f'write e.g. "{name}": {{"file_name": "{name}.json"}}.', file=where)
    hub = entry.get("hf_hub_url")
    if "file_name" not in entry and not hub:
        remote = [k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry]
        raise DataError(f"entry '{name}' has no file_name or hf_hub_url"
                        + (f" ({remote[0]} is not supported: lmtune reads local files and the "
                           "Hugging Face hub)" if remote else ""),
                        "download the data and set file_name to the local file.", file=where)
    for key, what, example in (("file_name", "a file name", "my_data.json"),
                               ("hf_hub_url", "a dataset id", "someone/some-data"),
                               ("subset", "a subset name", "default"), ("split", "a split name", "train")):
        if key in entry and not isinstance(entry[key], str):
            raise DataError(f"entry '{name}' has {key} {entry[key]!r}, which is not {what}.",
                            f"set {key} to text, e.g. \"{key}\": \"{example}\".", file=where)
    formatting = entry.get("formatting", "alpaca")
    if not isinstance(formatting, str) or formatting not in PARSERS:
        raise DataError(f"entry '{name}' has formatting '{formatting}'",
                        f"use one of: {', '.join(PARSERS)}.", file=where)
    if not isinstance(entry.get("ranking", False), bool):
        raise DataError(f"entry '{name}' has ranking {entry['ranking']!r}", "use true or false.",
                        file=where)
    num_samples = entry.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise DataError(f"entry '{name}' has num_samples {num_samples!r}",
                        "use a positive whole number of records to sample.", file=where)
    # columns and tags are looked up and compared by name: anything but text->text would fail
    # later, record by record, with an error that no longer points at this entry.
    for group, example in (("columns", '{"prompt": "question", "response": "answer"}'),
                           ("tags", '{"role_tag": "from", "user_tag": "human"}')):
        value = entry.get(group) or {}
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise DataError(f"entry '{name}' has {group} {value!r}; it must map names to text.",
                            f"write e.g. \"{group}\": {example}.", file=where)
    # A local copy (file_name) wins over the hub, unlike LLaMA-Factory: lmtune works offline first.
    file_name = str(dataset_dir / entry["file_name"]) if "file_name" in entry else ""
    return DatasetAttr(name=name, file_name=file_name, formatting=formatting,
                       ranking=entry.get("ranking", False), columns=entry.get("columns") or {},
                       tags=entry.get("tags") or {}, hf_hub_url=None if file_name else hub,
                       subset=entry.get("subset"), split=entry.get("split", "train"),
                       num_samples=num_samples, info_file=where)


def resolve_dataset(name: str, dataset_dir: Path, info: dict[str, Any]) -> DatasetAttr:
    """A name from `dataset:` -> its attributes: a dataset_info.json entry, or a file or folder."""
    if name in info:
        return _entry_attr(name, info[name], dataset_dir)
    for candidate in (Path(name), dataset_dir / name):
        if _is_file(candidate) or _is_dir(candidate):
            return DatasetAttr(name=name, file_name=str(candidate), formatting="")
    known = ", ".join(sorted(info)) or "none"
    raise DataError(f"dataset '{name}' is neither an entry of {dataset_dir / 'dataset_info.json'} nor "
                    "a file.", f"use a registered name (known: {known}) or a path to a data file "
                    f"({', '.join(FILE_TYPES)}) or folder.")


def check_kind(attr: DatasetAttr, kind: Kind, stage: str, where: str, registered: bool) -> None:
    """Preference data trains only rm and dpo, and those train only on preference data."""
    what = f"entry '{attr.name}'" if registered else "the file"
    if attr.ranking and kind != "preference":
        raise DataError(f"{what} is preference data (ranking: true, chosen/rejected), which stage "
                        f"{stage} cannot train on.",
                        "use an SFT dataset, or stage rm or dpo for preference data.", file=where)
    if kind == "preference" and not attr.ranking:
        raise DataError(f"{what} is not preference data, and stage {stage} trains on chosen/rejected "
                        "pairs.", 'mark the entry "ranking": true with chosen and rejected columns, '
                        "or use stage sft.", file=where)


# --- sampling and parsing -------------------------------------------------------------------------

def sample_indices(n: int, attr: DatasetAttr, cfg: RunConfig, counts: DatasetCounts) -> list[int]:
    """num_samples (seeded random sample, with replacement beyond n), then max_samples (first N),
    in LLaMA-Factory's order; both counted."""
    indices = list(range(n))
    if attr.num_samples is not None:
        rng = random.Random(f"{cfg.seed}:{attr.name}")
        rng.shuffle(indices)
        indices = indices[: attr.num_samples]
        extra = attr.num_samples - len(indices)
        indices += [rng.randrange(n) for _ in range(extra)]
        counts.num_samples = attr.num_samples
        counts.dropped_by_num_samples = max(0, n - attr.num_samples)
        counts.repeated_by_num_samples = extra
    if cfg.max_samples is not None and len(indices) > cfg.max_samples:
        counts.dropped_by_max_samples = len(indices) - cfg.max_samples
        indices = indices[: cfg.max_samples]  # the first N, as LLaMA-Factory users expect
    return indices


def _describe_bad(bad: list[tuple[str, int, str]], main_file: str) -> list[str]:
    return [f"{'' if file == main_file else file + ' '}record {index}: {reason}"
            for file, index, reason in bad[:BAD_SHOWN]]


def load_dataset_records(attr: DatasetAttr, cfg: RunConfig, counts: DatasetCounts,
                         kind: Kind) -> list[Record]:
    source = open_source(attr)
    counts.found = len(source)
    main_file = attr.file_name or str(attr.hf_hub_url)
    if not counts.found:
        raise DataError("the file holds no records", "add records, or remove the dataset from "
                        "dataset:.", file=main_file)
    if source.text_only and kind != "text":
        raise DataError(f"a .txt file holds plain text, which only stage pt trains on (this is stage "
                        f"{cfg.stage}).", "use a json/jsonl/csv/parquet file of records.", file=main_file)
    indices = sample_indices(counts.found, attr, cfg, counts)
    raw = source.take(indices)
    if not attr.formatting:
        first = next((i for i, r in enumerate(raw) if not isinstance(r, UnreadableRecord)), None)
        if first is None:
            file, index = source.locate(indices[0])
            raise DataError(f"no record can be read; {raw[0].reason}", "write one JSON object per "
                            "line (JSON Lines) or one JSON list.", file=file, record=index)
        try:
            attr.formatting, attr.ranking = guess_formatting(raw[first])
        except RecordError as exc:
            file, index = source.locate(indices[first])
            raise DataError(f"record {index}: {exc}", "register the file in dataset_info.json with "
                            "its formatting and columns.", file=file) from None
        check_kind(attr, kind, cfg.stage, main_file, registered=False)
    records, bad, missing = [], [], set()
    for index, record in zip(indices, raw):
        if isinstance(record, UnreadableRecord):
            bad.append((*source.locate(index), record.reason))
            continue
        try:
            parsed = parse_record(record, attr, kind)
        except RecordError as exc:
            bad.append((*source.locate(index), str(exc)))
            continue
        missing |= fill_placeholders(parsed, cfg.data_vars)
        records.append(parsed)
    if bad:
        shown = _describe_bad(bad, main_file)
        if not cfg.skip_bad_records:
            file, index, reason = bad[0]
            more = (f"; {len(bad):,} of {len(indices):,} records are bad, also "
                    + "; ".join(shown[1:])) if len(bad) > 1 else ""
            raise DataError(f"{reason} ({attr.formatting} format){more}",
                            "fix the records, check columns/tags in dataset_info.json, or set "
                            "skip_bad_records: true to skip bad records (they are counted).",
                            file=file, record=index)
        counts.bad, counts.bad_examples = len(bad), shown
    if not records:
        raise DataError(f"all {len(indices):,} records are bad and were skipped", "fix the records.",
                        file=main_file)
    counts.kept = len(records)
    counts.unfilled_placeholders = sorted(missing)
    return records


def load_records(cfg: RunConfig, kind: Kind | None = None) -> tuple[list[list[Record]], DataReport]:
    """Every dataset of `cfg.dataset`, in order, sampled and parsed (one list per dataset); with the
    counts. `kind` defaults to what cfg.stage trains on."""
    kind = kind or STAGE_KINDS[cfg.stage]
    dataset_dir = Path(cfg.dataset_dir)
    info = read_dataset_info(dataset_dir)
    report = DataReport(cutoff_len=cfg.cutoff_len, max_samples=cfg.max_samples, kind=kind)
    per_dataset: list[list[Record]] = []
    for name in cfg.dataset_names:
        attr = resolve_dataset(name, dataset_dir, info)
        if attr.formatting:  # a registered entry: its ranking flag is known before reading
            check_kind(attr, kind, cfg.stage, str(dataset_dir / "dataset_info.json"), registered=True)
        counts = DatasetCounts(name=name, file=attr.file_name or str(attr.hf_hub_url))
        report.datasets.append(counts)
        per_dataset.append(load_dataset_records(attr, cfg, counts, kind))
    return per_dataset, report


def load_conversations(cfg: RunConfig) -> tuple[list[Record], DataReport]:
    """The records of every dataset, concatenated in order (for stage sft: conversations)."""
    per_dataset, report = load_records(cfg)
    return [record for records in per_dataset for record in records], report


# --- mixing and the validation split --------------------------------------------------------------

def mix(per_dataset: list[list[Any]], strategy: str, probs: list[float] | None,
        seed: int) -> tuple[list[Any], list[int]]:
    """Combine datasets -> (rows, rows taken from each dataset).

    concat: one after another. interleave_under: draw a dataset per row (by `probs`, else in turn)
    and stop when one runs out. interleave_over: keep drawing, restarting datasets that ran out,
    until every one was used whole; small datasets repeat."""
    if strategy == "concat" or len(per_dataset) == 1:
        return [row for rows in per_dataset for row in rows], [len(rows) for rows in per_dataset]
    rng = random.Random(seed)
    positions = [0] * len(per_dataset)
    taken = [0] * len(per_dataset)
    # A dataset left with no rows (all dropped) takes no part; the others still mix.
    live = [i for i, rows in enumerate(per_dataset) if rows]
    exhausted = [not rows for rows in per_dataset]
    weights = [probs[i] for i in live] if probs is not None else None
    out: list[Any] = []
    step = 0
    while live:
        which = live[step % len(live)] if weights is None else rng.choices(live, weights=weights)[0]
        step += 1
        rows = per_dataset[which]
        if positions[which] == len(rows):
            exhausted[which] = True
            if strategy == "interleave_under" or all(exhausted):
                break
            positions[which] = 0
        out.append(rows[positions[which]])
        positions[which] += 1
        taken[which] += 1
        if strategy == "interleave_over" and positions[which] == len(rows):
            exhausted[which] = True
            if all(exhausted):
                break
    return out, taken


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
