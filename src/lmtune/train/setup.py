"""What every stage does before its own part: the output folder, the seed, tokenizer and model,
and the data with its report (printed and saved as data_report.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from lmtune import distributed as dist
from lmtune.config import RunConfig
from lmtune.data.pipeline import prepare_data, training_rows
from lmtune.data.streaming import RowStream
from lmtune.models.load import (add_new_tokens, fit_vocab, load_model, load_tokenizer, model_options,
                                quantization_config, resolve_for, stop_token_ids, trains_vocab)
from lmtune.models.precision import checkpoint_half_dtype, half_frozen_base
from lmtune.train.checkpoint import prepare_run
from lmtune.train.trackers import tracker_names


@dataclass
class RunInputs:
    output_dir: Path
    resume_dir: Path | None  # the checkpoint to continue from, if resuming
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel | None  # as loaded (frozen_dtype: maybe half precision); see take_model
    train_rows: list[Any] | RowStream
    val_rows: list[Any]
    val_groups: list[tuple[str, int]]  # eval_on_each_dataset: (name, rows) in val_rows' order

    def take_model(self) -> PreTrainedModel:
        """The loaded model, handed to the stage, which applies the method: no reference stays
        here, so the run holds the base only through what it trains (a base the method replaced
        was once held here, in full precision, for the whole run)."""
        model, self.model = self.model, None
        return model

    def row_counts(self) -> dict[str, int]:
        if isinstance(self.train_rows, RowStream):  # not known up front; train_tokens still counts
            return {"val_rows": len(self.val_rows)}
        return {"train_rows": len(self.train_rows), "val_rows": len(self.val_rows)}


def start_run(cfg: RunConfig) -> RunInputs:
    tracker_names(cfg)  # a tracker asked for but not installed stops the run before anything starts
    output_dir = Path(cfg.output_dir)
    dist.init(cfg)
    # The output folder is checked (by rank 0, for all ranks) before anything heavy loads.
    resume_dir = dist.on_main(prepare_run, cfg)
    set_seed(cfg.seed)
    model_path = resolve_for(cfg)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    added = add_new_tokens(tokenizer, cfg)
    half = half_frozen_base(cfg, None if cfg.train_from_scratch else checkpoint_half_dtype(model_path))
    # A QLoRA base is quantized as it loads: its full-precision weights are never all held at once.
    quantization = quantization_config(cfg)
    model = load_model(model_path, cfg.trust_remote_code, **model_options(cfg, training=True),
                       quantization=quantization, from_scratch=cfg.train_from_scratch,
                       half_precision=half)
    if trains_vocab(cfg):
        fit_vocab(model, len(tokenizer), tokenizer.convert_tokens_to_ids(added) if added else None)
    with dist.main_first():  # rank 0 fills the encoding cache, the others read it
        # Replay answers are cached per base whatever the run's precision, so they always come
        # from the full-precision base (loaded by replay itself when the cache misses).
        data = prepare_data(cfg, tokenizer, stop_token_ids(tokenizer, model),
                            None if half or quantization else model)
        train_rows, val_rows = training_rows(data, cfg, model.config)
    data.report.show()
    dist.on_main(data.report.save, output_dir / "data_report.json")
    return RunInputs(output_dir, resume_dir, tokenizer, model, train_rows, val_rows, data.val_groups)
