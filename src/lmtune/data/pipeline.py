"""From a config to the rows a stage trains on, with the report of every count on the way.

    prepare_data   template -> records per dataset (sources) -> encoded rows per dataset (encode,
                   cached, in parallel when preprocessing_num_workers > 1) -> mix -> val split
    training_rows  packing, when on

`lmtune train` and `lmtune plan` both go through these two functions, so the plan counts exactly the
rows that train.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune.config import RunConfig, split_list
from lmtune.data import cache, tokenized
from lmtune.data.batching import check_packing_isolation, pack_documents, pack_rows
from lmtune.data.encode import (NO_TARGET, OVER_LONG, TRUNCATED, ChatEncoder, Result, Row,
                                TextEncoder)
from lmtune.data.formats import STAGE_KINDS, Kind, Record
from lmtune.data.replay import replay_records
from lmtune.data.report import DatasetCounts, DataReport, LengthStats, PackingStats
from lmtune.data.sources import load_records, mix, split_validation
from lmtune.data.templates import BUILTIN, end_token_id, use_template
from lmtune.errors import DataError

CHUNK = 256  # records per tokenizer call and per task of a worker process


@dataclass
class PreparedData:
    train: list[Row]  # streaming: a data.streaming.RowStream, read while training runs
    val: list[Row]
    report: DataReport
    kind: Kind
    # eval_on_each_dataset: (name, rows) of each eval dataset, in the order their rows fill `val`
    val_groups: list[tuple[str, int]] = field(default_factory=list)


def make_encoder(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int],
                 kind: Kind) -> tuple[ChatEncoder | TextEncoder, list[str]]:
    """The encoder for `kind`, with notes about the chat template it uses."""
    if kind == "text":  # plain text needs no chat template
        return TextEncoder(tokenizer, cfg.cutoff_len, cfg.cutoff_policy, cfg.packing_enabled), []
    had_template = bool(tokenizer.chat_template)
    notes = use_template(tokenizer, cfg.template)
    stops = list(stop_ids)
    if not had_template and cfg.template in BUILTIN:
        end = end_token_id(tokenizer, cfg.template)
        stops += [end] if end is not None else []
    return ChatEncoder(tokenizer, stops, cfg.cutoff_len, train_on_prompt=cfg.train_on_prompt,
                       mask_history=cfg.mask_history, cutoff_policy=cfg.cutoff_policy,
                       default_system=cfg.default_system, enable_thinking=cfg.enable_thinking), notes


# What forked workers inherit: the encoder (tokenizer included) and the records, so only chunk
# bounds travel to them, never pickled records or tokenizers.
_worker: tuple[ChatEncoder | TextEncoder, list[Record]] | None = None


def _start_worker(encoder: ChatEncoder | TextEncoder, records: list[Record]) -> None:
    global _worker
    _worker = (encoder, records)


def _encode_chunk(bounds: tuple[int, int]) -> tuple[dict[str, Any], dict[str, str]]:
    assert _worker is not None  # set by the pool initializer
    encoder, records = _worker
    return cache.to_arrays(encoder.encode_records(records[bounds[0]: bounds[1]]))


def encode_all(encoder: ChatEncoder | TextEncoder, records: list[Record], workers: int,
               name: str) -> list[Result]:
    """Encode in chunks, in worker processes when asked. Workers are forked, so they share the
    tokenizer and the records without pickling them; each returns its rows as flat arrays."""
    chunks = [(i, min(i + CHUNK, len(records))) for i in range(0, len(records), CHUNK)]
    progress = tqdm(total=len(records), desc=f"encode {name}", unit="record", mininterval=1.0,
                    disable=len(records) < 20 * CHUNK)
    results: list[Result] = []
    if workers > 1 and len(chunks) > 1 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(chunks)), initializer=_start_worker,
                          initargs=(encoder, records)) as pool:
            for arrays, meta in pool.imap(_encode_chunk, chunks):
                part = cache.from_arrays(arrays, meta)
                results += part
                progress.update(len(part))
    else:
        for start, end in chunks:
            results += encoder.encode_records(records[start:end])
            progress.update(end - start)
    progress.close()
    return results


def _tally(results: list[Result], counts: DatasetCounts) -> list[Row]:
    rows = [row for row, _ in results if row is not None]
    statuses = [status for _, status in results]
    counts.truncated = statuses.count(TRUNCATED)
    counts.dropped_over_long = statuses.count(OVER_LONG)
    counts.dropped_no_target = statuses.count(NO_TARGET)
    counts.kept = len(rows)
    counts.tokens = _split_stats(rows)
    return rows


def _split_stats(rows: list[Row]) -> LengthStats:
    return LengthStats.of([r.length for r in rows], sum(r.n_tokens for r in rows),
                          sum(r.n_targets for r in rows))


def prepare_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int],
                 model: PreTrainedModel | None = None) -> PreparedData:
    """Encoded train and val rows of `cfg.dataset` for cfg.stage, and the report of every count.
    `model`, the base as loaded, answers the `replay` prompts when they are not cached yet."""
    kind = STAGE_KINDS[cfg.stage]
    encoder, notes = make_encoder(cfg, tokenizer, stop_ids, kind)
    if cfg.streaming:  # the train split is read while training runs (data/streaming.py)
        from lmtune.data.streaming import prepare_streaming

        return prepare_streaming(cfg, tokenizer, stop_ids, encoder, notes)
    settings = {"kind": kind, "cutoff_len": cfg.cutoff_len, "cutoff_policy": cfg.cutoff_policy,
                "train_on_prompt": cfg.train_on_prompt, "mask_history": cfg.mask_history,
                "packing": cfg.packing_enabled if kind == "text" else None,
                "default_system": cfg.default_system, "enable_thinking": cfg.enable_thinking}
    stops = sorted(encoder.stop_ids) if isinstance(encoder, ChatEncoder) else []
    fingerprint = cache.tokenizer_fingerprint(tokenizer, stops)
    saved = tokenized.load(cfg.tokenized_path, kind, fingerprint, settings) if cfg.tokenized_path else None
    if saved is not None:
        return _from_tokenized(cfg, kind, *saved, notes)
    per_dataset, report = load_records(cfg, kind)
    report.notes += notes
    report.mix_strategy = cfg.mix_strategy

    def encode_datasets(per_dataset: list[list[Record]], counts_list: list[DatasetCounts]) -> list[list[Row]]:
        encoded: list[list[Row]] = []
        for records, counts in zip(per_dataset, counts_list):
            key = cache.cache_key(records, fingerprint, settings)
            results = None if cfg.overwrite_cache else cache.load(key)
            counts.cache = "hit" if results is not None else "built"
            if results is None:
                results = encode_all(encoder, records, cfg.preprocessing_num_workers or 1, counts.name)
                cache.save(key, results)
            encoded.append(_tally(results, counts))
        return encoded

    encoded = encode_datasets(per_dataset, report.datasets)
    if not any(encoded):
        raise DataError(f"no row of {', '.join(d.name for d in report.datasets)} has a trained token "
                        f"left within cutoff_len={cfg.cutoff_len}.",
                        "raise cutoff_len, or check the report with `lmtune plan`.")
    rows, taken = mix(encoded, cfg.mix_strategy, cfg.interleave_prob_list, cfg.seed)
    if cfg.mix_strategy != "concat":
        for counts, n in zip(report.datasets, taken):
            counts.mixed = n
    if cfg.replay is not None:  # after the mix: interleave_probs weigh only the named datasets
        assert isinstance(encoder, ChatEncoder)  # replay is refused for every stage but sft
        records, counts, note = replay_records(cfg, tokenizer, encoder, model)
        report.datasets.append(counts)
        report.notes.append(note)
        rows += encode_datasets([records], [counts])[0]
    val_groups: list[tuple[str, int]] = []
    if cfg.eval_dataset:  # held-out files: every row of `dataset` trains
        per_eval, eval_report = load_records(cfg.model_copy(update={"dataset": cfg.eval_dataset}), kind)
        for counts in eval_report.datasets:
            counts.name = f"{counts.name} (eval)"
        per_eval_rows = encode_datasets(per_eval, eval_report.datasets)
        train, val = rows, [row for rows_ in per_eval_rows for row in rows_]
        report.datasets += eval_report.datasets
        if cfg.eval_on_each_dataset:
            val_groups = [(Path(name).stem, len(rows_))
                          for name, rows_ in zip(split_list(cfg.eval_dataset), per_eval_rows)]
    else:
        train, val = split_validation(rows, cfg.val_size, cfg.seed)
    report.train, report.val = _split_stats(train), _split_stats(val)
    if cfg.tokenized_path:
        from lmtune.train.fingerprint import data_fingerprint

        tokenized.save(cfg.tokenized_path, train, val, kind, fingerprint, settings,
                       cfg.dataset_names + split_list(cfg.eval_dataset), data_fingerprint(cfg),
                       val_groups)
    return PreparedData(train, val, report, kind, val_groups)


def _from_tokenized(cfg: RunConfig, kind: Kind, train: list[Row], val: list[Row],
                    saved: dict[str, Any], notes: list[str]) -> PreparedData:
    """Rows read back from tokenized_path, with a report that says where they came from."""
    counts = DatasetCounts(name=", ".join(saved["datasets"]), file=str(cfg.tokenized_path),
                           found=len(train), kept=len(train), cache="tokenized_path",
                           tokens=_split_stats(train))
    note = (f"rows loaded as saved at tokenized_path {cfg.tokenized_path} (encoded from "
            f"{', '.join(saved['datasets'])}); the data files and data keys (dataset, max_samples, "
            "val_size, mix) were not read")
    report = DataReport(datasets=[counts], train=_split_stats(train), val=_split_stats(val),
                        cutoff_len=cfg.cutoff_len, max_samples=cfg.max_samples, kind=kind,
                        mix_strategy=cfg.mix_strategy, notes=notes + [note])
    groups = [(name, n) for name, n in saved.get("val_groups", [])] if cfg.eval_on_each_dataset else []
    return PreparedData(train, val, report, kind, groups)


def training_rows(data: PreparedData, cfg: RunConfig, model_config) -> tuple[list[Row], list[Row]]:
    """The rows the loop iterates: packed into cutoff_len rows when packing is on (after checking
    that this architecture keeps packed samples apart), else as encoded. Each eval dataset of
    eval_on_each_dataset is packed on its own, so no packed row mixes two of them."""
    if cfg.streaming:
        from lmtune.data.streaming import streaming_training_rows

        return streaming_training_rows(data, cfg, model_config)
    if not cfg.packing_enabled:
        return data.train, data.val
    check_packing_isolation(model_config)
    pack = pack_documents if data.kind == "text" else pack_rows
    train, val = pack(data.train, cfg.cutoff_len), []
    groups, start = [], 0
    for name, n in data.val_groups or [("", len(data.val))]:
        packed = pack(data.val[start: start + n], cfg.cutoff_len)
        val += packed
        groups.append((name, len(packed)))
        start += n
    if data.val_groups:
        data.val_groups = groups
    data.report.packing = PackingStats(samples=len(data.train), rows=len(train),
                                       tokens=sum(r.n_tokens for r in train), capacity=cfg.cutoff_len)
    return train, val
