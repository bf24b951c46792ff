"""streaming: true. Training rows are read from the data files, encoded and shuffled while the loop
asks for them, so a file larger than memory trains without being loaded, encoded or cached first.

One pass over the data:
    each dataset's files, record by record (JSON Lines / CSV / text line by line, a JSON list one
    element at a time, parquet and arrow by record batch, saved and hub datasets through their
    memory-mapped Arrow tables), the first max_samples records of each
 -> parsed and encoded CHUNK records at a time, with the encoder of the non-streaming path (same
    token ids and labels for the same record)
 -> mixed (concat: one dataset after another; interleave_*: the same draws as `sources.mix`)
 -> the first val_size rows set aside as the val split (read once, at set-up)
 -> shuffled through a buffer of buffer_size rows, seeded by (seed, pass)
 -> packed, when on (pt: documents back to back; sft: best fit within each buffer_size rows).

What is in memory at any time: one chunk of records, the shuffle buffer, a packing group. When a pass
ends before max_steps, the next pass reads the files again (a new shuffle). The order depends only on
the seed and the data, so a resumed run replays the passes up to its checkpoint and goes on with the
rows after those already trained. Row counts are not known before the data has been read: the
report says so instead of giving totals.

Stages sft, pt and rm stream through the shared loop (engine.fit takes a RowStream for its rows);
dpo and kto score every row with the reference model before training, and ppo runs its own loop,
so config/rules.py refuses streaming there.
"""

from __future__ import annotations

import copy
import csv
import json
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmtune.config import RunConfig, split_list
from lmtune.data.batching import check_packing_isolation, iter_pack_documents, pack_rows
from lmtune.data.encode import NO_TARGET, OVER_LONG, TRUNCATED, ChatEncoder, Row, TextEncoder
from lmtune.data.formats import STAGE_KINDS, DatasetAttr, Kind, RecordError, fill_placeholders, \
    guess_formatting, parse_record
from lmtune.data.report import DataReport, DatasetCounts
from lmtune.data.sources import (BAD_SHOWN, FILE_TYPES, TableFile, UnreadableRecord, _folder_files,
                                 _hub_dataset, _is_dir, _is_file, _json_limit, _JSON_LIMITS,
                                 _saved_dataset, check_kind, read_dataset_info, resolve_dataset)
from lmtune.errors import ConfigError, DataError

CHUNK = 256  # records per tokenizer call, as the non-streaming path encodes them
READ_BLOCK = 1 << 18  # characters read at a time from a JSON list


# --- files -> raw records, one at a time ---------------------------------------------------------

def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"not UTF-8 text (a byte {exc.object[exc.start]:#04x})", "save the file as UTF-8.",
                     file=str(path))


def _json_lines(path: Path, handle) -> Iterator[Any]:
    # newline="\n": lines end at \n only, as JSON Lines (and the non-streaming reader) split them.
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            yield UnreadableRecord(f"line {number} is not valid JSON: {exc.msg} "
                                   "(write one JSON object per line)")
        except _JSON_LIMITS as exc:
            yield UnreadableRecord(f"line {number}: {' '.join(_json_limit(exc))}")


def _json_list(path: Path, handle) -> Iterator[Any]:
    """The elements of a JSON list, decoded one at a time from blocks of the file."""
    decoder = json.JSONDecoder()
    text, at, done, index = "", 0, False, 0

    def more() -> bool:
        nonlocal text, at, done
        block = handle.read(READ_BLOCK)
        text, at = text[at:] + block, 0
        done = not block
        return bool(block)

    def skip_space() -> str:
        nonlocal at
        while True:
            while at < len(text) and text[at] in " \t\r\n":
                at += 1
            if at < len(text) or not more():
                return text[at] if at < len(text) else ""

    def broken(what: str) -> DataError:
        return DataError(f"not valid JSON: {what} after record {index}", "fix the JSON syntax.",
                         file=str(path))

    def finish() -> None:
        nonlocal at
        at += 1
        if skip_space():
            raise broken("text after the list")

    if skip_space() != "[":
        raise broken("no list")
    at += 1
    if skip_space() == "]":
        return finish()
    while True:
        skip_space()
        while True:
            try:
                value, end = decoder.raw_decode(text, at)
            except json.JSONDecodeError as exc:
                if not done and more():
                    continue
                raise broken(exc.msg.lower()) from None
            except _JSON_LIMITS as exc:
                raise DataError(*_json_limit(exc), file=str(path)) from None
            # A number cut by the block's end decodes as its prefix ("-0" of "-0.5e3", leaving
            # at most "." or "e+" unread): read on and decode again (reading moves the text).
            tail = text[end:]
            if not done and len(tail) <= 2 and not any(c in " \t\r\n,]" for c in tail):
                more()
                continue
            break
        at = end
        yield value
        index += 1
        following = skip_space()
        if following == "]":
            return finish()
        at += 1
        if following != ",":
            raise broken("a missing ',' or ']'" if following else "the end of the file")


def _text_records(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            # splitlines as the non-streaming reader does: it also ends lines at \v, \x85, ...
            for part in line.splitlines():
                if part.strip():
                    yield {"text": part}


def _starts_a_list(handle) -> bool:
    """Whether the file's first non-blank character opens a JSON list (else: JSON Lines)."""
    while block := handle.read(4096):
        if block.strip():
            return block.lstrip().startswith("[")
    return False


def _file_records(path: Path) -> Iterator[Any]:
    """The raw records of one file, in order, never holding the whole file."""
    kind = FILE_TYPES.get(path.suffix)
    if kind is None:
        raise DataError(f"unsupported file type '{path.suffix}'", f"use one of: {', '.join(FILE_TYPES)}.",
                        file=str(path))
    try:
        if kind == "json":
            with open(path, encoding="utf-8", newline="\n") as handle:
                is_list = path.suffix == ".json" and _starts_a_list(handle)
                handle.seek(0)
                yield from (_json_list if is_list else _json_lines)(path, handle)
        elif kind == "csv":
            with open(path, encoding="utf-8", newline="") as handle:
                try:
                    yield from csv.DictReader(handle)
                except csv.Error as exc:
                    raise DataError(f"not valid CSV: {exc}", "write a header row, then one record "
                                    "per row.", file=str(path)) from None
        elif kind == "text":
            yield from _text_records(path)
        elif kind == "parquet":
            yield from _parquet_records(path)
        else:
            yield from _arrow_records(path)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except OSError as exc:
        raise DataError(f"cannot be read: {exc.strerror or exc}", "check the file and its permissions.",
                        file=str(path)) from None


def _parquet_records(path: Path) -> Iterator[Any]:
    import pyarrow
    import pyarrow.parquet

    try:
        reader = pyarrow.parquet.ParquetFile(str(path))
        for batch in reader.iter_batches(batch_size=CHUNK):
            yield from batch.to_pylist()
    except pyarrow.ArrowException as exc:
        raise DataError(f"cannot be read as parquet: {str(exc).splitlines()[0]}",
                        "check that it is a complete .parquet file.", file=str(path)) from None


def _arrow_records(path: Path) -> Iterator[Any]:
    import pyarrow
    import pyarrow.ipc

    try:
        with pyarrow.memory_map(str(path)) as source:  # mapped: batches are paged in, not copied
            try:  # the datasets library writes the streaming format; others write the file format
                batches: Iterable[Any] = pyarrow.ipc.open_stream(source)
            except pyarrow.ArrowInvalid:
                source.seek(0)
                reader = pyarrow.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                yield from batch.to_pylist()
    except pyarrow.ArrowException as exc:
        raise DataError(f"cannot be read as arrow: {str(exc).splitlines()[0]}",
                        "check that it is a complete .arrow file.", file=str(path)) from None


def _table_records(table: TableFile) -> Iterator[Any]:
    # saved and hub datasets are memory-mapped Arrow tables: a slice reads only its rows.
    for start in range(0, len(table), CHUNK):
        yield from table.take(range(start, min(start + CHUNK, len(table))))


class StreamSource:
    """The files of one dataset, resolved (and checked to exist) without reading any record."""

    def __init__(self, attr: DatasetAttr):
        self.attr = attr
        self.table: TableFile | None = None
        self.files: list[Path] = []
        if not attr.file_name:
            self.table = TableFile(Path(attr.hf_hub_url or attr.name), _hub_dataset(attr))
            return
        path = Path(attr.file_name)
        if _is_dir(path):
            if _is_file(path / "state.json") or _is_file(path / "dataset_dict.json"):
                self.table = TableFile(path, _saved_dataset(path, attr.split))
            else:
                self.files = _folder_files(path)
        elif _is_file(path):
            self.files = [path]
        else:
            raise DataError("file not found", "check file_name in dataset_info.json or the path in "
                            "dataset:.", file=str(path))
        if any(FILE_TYPES.get(p.suffix) is None for p in self.files):
            bad = next(p for p in self.files if FILE_TYPES.get(p.suffix) is None)
            raise DataError(f"unsupported file type '{bad.suffix}'",
                            f"use one of: {', '.join(FILE_TYPES)}.", file=str(bad))

    @property
    def text_only(self) -> bool:
        return bool(self.files) and self.files[0].suffix == ".txt"

    def records(self) -> Iterator[tuple[str, int, Any]]:
        """(file, index in that file, raw record), file after file."""
        if self.table is not None:
            for index, record in enumerate(_table_records(self.table)):
                yield str(self.table.path), index, record
            return
        for path in self.files:
            for index, record in enumerate(_file_records(path)):
                yield str(path), index, record


# --- one dataset -> encoded rows ------------------------------------------------------------------

class DatasetStream:
    """One dataset of `dataset:` read as a stream of encoded rows, pass after pass."""

    def __init__(self, attr: DatasetAttr, cfg: RunConfig, kind: Kind, encoder: ChatEncoder | TextEncoder):
        if attr.num_samples is not None:
            raise ConfigError(f"streaming: dataset '{attr.name}' sets num_samples, a random sample "
                              "of all its records, which needs them all read before training.",
                              f"remove num_samples from {attr.info_file}, use max_samples (the first "
                              "N records), or set streaming: false.")
        self.attr, self.cfg, self.kind, self.encoder = attr, cfg, kind, encoder
        self.source = StreamSource(attr)
        self.main_file = attr.file_name or str(attr.hf_hub_url)
        if self.source.text_only and kind != "text":
            raise DataError(f"a .txt file holds plain text, which only stage pt trains on (this is "
                            f"stage {cfg.stage}).", "use a json/jsonl/csv/parquet file of records.",
                            file=self.main_file)
        self.warned: set[str] = set()  # what was said once already (every pass meets it again)

    def _warn(self, key: str, text: str) -> None:
        if key not in self.warned and len(self.warned) < BAD_SHOWN:
            self.warned.add(key)
            print(f"warning: {text}")

    def _parsed(self) -> Iterator[Any]:
        attr, cfg = self.attr, self.cfg
        taken, bad = 0, 0
        records = self.source.records()
        if cfg.max_samples is not None:  # the first N records of the dataset, as without streaming
            records = islice(records, cfg.max_samples)
        for file, index, raw in records:
            taken += 1
            if not attr.formatting and not isinstance(raw, UnreadableRecord):
                try:
                    attr.formatting, attr.ranking = guess_formatting(raw)
                except RecordError as exc:
                    raise DataError(f"record {index}: {exc}", "register the file in "
                                    "dataset_info.json with its formatting and columns.",
                                    file=file) from None
                check_kind(attr, self.kind, cfg.stage, self.main_file, registered=False)
            try:
                if isinstance(raw, UnreadableRecord):
                    raise RecordError(raw.reason)
                parsed = parse_record(raw, attr, self.kind)
            except RecordError as exc:
                if not cfg.skip_bad_records:
                    raise DataError(f"{exc} ({attr.formatting or 'unknown'} format)",
                                    "fix the record, check columns/tags in dataset_info.json, or set "
                                    "skip_bad_records: true to skip bad records.",
                                    file=file, record=index) from None
                bad += 1
                self._warn(f"{file}:{index}", f"skip_bad_records skipped {file} record {index}: {exc}")
                continue
            missing = fill_placeholders(parsed, cfg.data_vars)
            if missing:
                keys = ", ".join("{{" + k + "}}" for k in sorted(missing))
                self._warn(keys, f"{attr.name} contains {keys} with no value in data_vars; they "
                           "train as literal text")
            yield parsed
        if not taken:
            raise DataError("the file holds no records", "add records, or remove the dataset from "
                            "dataset:.", file=self.main_file)
        if taken == bad:
            raise DataError(f"all {taken:,} records are bad and were skipped", "fix the records.",
                            file=self.main_file)

    def rows(self) -> Iterator[Row]:
        """One pass: the dataset's encoded rows (those the encoder keeps), in file order. What
        cutoff_len does to them cannot be counted up front, so it is said when first seen."""
        cutoff, name = self.cfg.cutoff_len, self.attr.name
        said = {TRUNCATED: f"cutoff_len={cutoff} truncates rows of {name}",
                OVER_LONG: f"cutoff_len={cutoff} with cutoff_policy: drop removes rows of {name}",
                NO_TARGET: f"cutoff_len={cutoff} leaves rows of {name} without a response token; "
                           "they are dropped"}
        parsed = self._parsed()
        while chunk := list(islice(parsed, CHUNK)):
            for row, status in self.encoder.encode_records(chunk):
                if status in said:
                    self._warn(status, said[status] + " (streaming: not counted up front)")
                if row is not None:
                    yield row


# --- datasets -> one stream -----------------------------------------------------------------------

class _Peek:
    """An iterator that knows whether it has another item."""

    def __init__(self, items: Iterator[Any]):
        self.items = items
        self.pending = list(islice(items, 1))

    def has_next(self) -> bool:
        return bool(self.pending)

    def __next__(self) -> Any:
        item = self.pending.pop()
        self.pending = list(islice(self.items, 1))
        return item


def mix_streams(streams: list[Callable[[], Iterator[Row]]], strategy: str, probs: list[float] | None,
                seed: int) -> Iterator[Row]:
    """`sources.mix` over streams: the same rows in the same order as it gives for the same datasets.
    A stream that interleave_over restarts is read again from its first row."""
    if strategy == "concat" or len(streams) == 1:
        yield from chain.from_iterable(stream() for stream in streams)
        return
    rng = random.Random(seed)
    its = [_Peek(stream()) for stream in streams]
    live = [i for i, it in enumerate(its) if it.has_next()]
    exhausted = [not it.has_next() for it in its]
    weights = [probs[i] for i in live] if probs is not None else None
    step = 0
    while live:
        which = live[step % len(live)] if weights is None else rng.choices(live, weights=weights)[0]
        step += 1
        if not its[which].has_next():
            exhausted[which] = True
            if strategy == "interleave_under" or all(exhausted):
                return
            its[which] = _Peek(streams[which]())
        yield next(its[which])
        if strategy == "interleave_over" and not its[which].has_next():
            exhausted[which] = True
            if all(exhausted):
                return


def shuffle_buffer(rows: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Rows in a random order drawn through a buffer of `size`: each new row takes the place of a
    random one, which goes out; the rest go out shuffled at the end."""
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def _pack_groups(rows: Iterable[Row], size: int, capacity: int) -> Iterator[Row]:
    """sft packing: best fit within each group of `size` consecutive rows."""
    it = iter(rows)
    while group := list(islice(it, size)):
        yield from pack_rows(group, capacity)


class RowStream:
    """The training rows of a streaming run: `passes()` yields one pass after another, `windows()`
    the micro-batches of each optimizer step. Nothing is read before the loop asks."""

    def __init__(self, cfg: RunConfig, kind: Kind, datasets: list[DatasetStream], skip: int):
        self.cfg, self.kind, self.datasets, self.skip = cfg, kind, datasets, skip
        self.packing = False
        self.convert: Callable[[Row], Any] | None = None
        self.epoch = 0  # passes completed by what `windows` handed out

    def map(self, convert: Callable[[Row], Any]) -> RowStream:
        """This stream with each row converted as `windows` hands it out (rm: pairs to ScoredPair)."""
        mapped = copy.copy(self)
        mapped.convert = convert
        return mapped

    def mixed(self) -> Iterator[Row]:
        """One pass of every dataset, mixed, before the val split is taken off."""
        cfg = self.cfg
        return mix_streams([d.rows for d in self.datasets], cfg.mix_strategy,
                           cfg.interleave_prob_list, cfg.seed)

    def encoded(self) -> Iterator[Row]:
        """One pass of the training rows as encoded: in file (mix) order, unshuffled, unpacked."""
        return islice(self.mixed(), self.skip, None)

    def one_pass(self, number: int) -> Iterator[Row]:
        cfg = self.cfg
        rows = self.encoded()
        if not cfg.disable_shuffling:
            rows = shuffle_buffer(rows, cfg.buffer_size, random.Random(cfg.seed * 100_003 + number))
        if self.packing:
            rows = (iter_pack_documents(rows, cfg.cutoff_len) if self.kind == "text"
                    else _pack_groups(rows, cfg.buffer_size, cfg.cutoff_len))
        return rows

    def passes(self) -> Iterator[tuple[int, Row]]:
        """(pass number, row), pass after pass, without end."""
        number = 0
        while True:
            empty = True
            for row in self.one_pass(number):
                empty = False
                yield number, row
            if empty:
                names = ", ".join(d.attr.name for d in self.datasets)
                raise DataError(f"streaming: no training row of {names} has a trained token left "
                                f"within cutoff_len={self.cfg.cutoff_len}"
                                + (f" after the {self.skip} val_size rows" if self.skip else "") + ".",
                                "raise cutoff_len, lower val_size, or add data.")
            number += 1

    def windows(self, per_step: int) -> Iterator[list[list[Row]]]:
        """Each optimizer step's micro-batches (all ranks together): `per_step` micro-batches of
        per_device_train_batch_size rows, taken from the stream in order across passes."""
        batch = self.cfg.per_device_train_batch_size
        stream = self.passes()
        while True:
            rows = list(islice(stream, batch * per_step))
            self.epoch = rows[-1][0]
            rows_only = [self.convert(row) if self.convert else row for _, row in rows]
            yield [rows_only[i: i + batch] for i in range(0, len(rows_only), batch)]


# --- set-up ---------------------------------------------------------------------------------------

def prepare_streaming(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int],
                      encoder: ChatEncoder | TextEncoder, notes: list[str]):
    """PreparedData whose `train` is a RowStream; the val split (the first val_size rows, or
    eval_dataset loaded whole as without streaming) is read now."""
    from lmtune.data.pipeline import PreparedData, _split_stats, prepare_data

    kind = STAGE_KINDS[cfg.stage]
    dataset_dir = Path(cfg.dataset_dir)
    info = read_dataset_info(dataset_dir)
    report = DataReport(cutoff_len=cfg.cutoff_len, max_samples=cfg.max_samples, kind=kind,
                        mix_strategy=cfg.mix_strategy, notes=list(notes), streaming=True)
    datasets = []
    for name in cfg.dataset_names:
        attr = resolve_dataset(name, dataset_dir, info)
        if attr.formatting:
            check_kind(attr, kind, cfg.stage, str(dataset_dir / "dataset_info.json"), registered=True)
        report.datasets.append(DatasetCounts(name=name, file=attr.file_name or str(attr.hf_hub_url),
                                             streamed=True))
        datasets.append(DatasetStream(attr, cfg, kind, encoder))
    n_val = int(cfg.val_size)
    stream = RowStream(cfg, kind, datasets, n_val)
    # The val rows, and the first training row: errors in the first records show before training.
    head = list(islice(stream.mixed(), n_val + 1))
    if not head:
        raise DataError(f"no row of {', '.join(cfg.dataset_names)} has a trained token left within "
                        f"cutoff_len={cfg.cutoff_len}.", "raise cutoff_len, or check the data.")
    if len(head) <= n_val:
        raise DataError(f"streaming: val_size={n_val} takes the first {n_val} rows, and the data has "
                        f"only {len(head)} rows with a trained token.", "lower val_size.")
    val = head[:n_val]
    val_groups: list[tuple[str, int]] = []
    if cfg.eval_dataset:  # held-out files are loaded whole, as without streaming
        held_out = prepare_data(cfg.model_copy(update={
            "dataset": cfg.eval_dataset, "eval_dataset": None, "streaming": False, "val_size": 0.0,
            "mix_strategy": "concat", "interleave_probs": None, "replay": None,
            "tokenized_path": None}), tokenizer, stop_ids)
        val = held_out.train
        for counts in held_out.report.datasets:
            counts.name = f"{counts.name} (eval)"
        report.datasets += held_out.report.datasets
        if cfg.eval_on_each_dataset:
            val_groups = [(Path(name).stem, counts.kept) for name, counts
                          in zip(split_list(cfg.eval_dataset), held_out.report.datasets)]
    report.val = _split_stats(val)
    what = "records" if cfg.max_samples is None else f"the first max_samples={cfg.max_samples} records"
    report.notes.append(
        f"streaming: {what} of each dataset are read, encoded and shuffled (buffer_size "
        f"{cfg.buffer_size}, seed {cfg.seed}) while training runs, nothing is cached; how many "
        "rows and tokens the data holds is not known up front"
        + (f"; the val split is its first {n_val} rows" if n_val else ""))
    if (cfg.preprocessing_num_workers or 1) > 1:
        report.notes.append("streaming encodes in the training process as rows are needed; "
                            "preprocessing_num_workers is not used")
    return PreparedData(stream, val, report, kind, val_groups)  # type: ignore[arg-type]


def streaming_training_rows(data, cfg: RunConfig, model_config) -> tuple[RowStream, list[Row]]:
    """Packing for a streaming run: the stream packs as it goes; the val rows are packed now."""
    stream: RowStream = data.train
    if not cfg.packing_enabled:
        return stream, data.val
    check_packing_isolation(model_config)
    stream.packing = True
    pack = (lambda rows: list(iter_pack_documents(rows, cfg.cutoff_len))) if data.kind == "text" \
        else (lambda rows: pack_rows(rows, cfg.cutoff_len))
    val, groups, start = [], [], 0
    for name, n in data.val_groups or [("", len(data.val))]:
        packed = pack(data.val[start: start + n])
        val += packed
        groups.append((name, len(packed)))
        start += n
    if data.val_groups:
        data.val_groups = groups
    data.report.notes.append(
        "streaming with packing: " + ("documents are packed back to back as they stream"
                                      if data.kind == "text" else
                                      f"rows are packed best-fit within each {cfg.buffer_size} rows"))
    return stream, val
