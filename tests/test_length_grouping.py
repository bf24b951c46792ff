"""sft and pt regroup a step's rows by length across its micro-batches: less padding, and the
same update, because their loss is a sum over rows normalised by the whole window's targets."""

from __future__ import annotations

import pytest

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.data.batching import group_by_length
from lmtune.data.encode import EncodedRow
from lmtune.errors import ConfigError
from lmtune.train import engine
from lmtune.train.logs import read_log
from tests.conftest import write_yaml


def rows(*lengths: int) -> list[EncodedRow]:
    return [EncodedRow(list(range(n)), list(range(n))) for n in lengths]


def test_rows_are_regrouped_shortest_together_in_batches_of_the_same_sizes():
    window = [rows(9, 2, 7), rows(3, 8), rows(5, 4)]
    grouped = group_by_length(window)
    assert [[len(r.input_ids) for r in batch] for batch in grouped] == [[2, 3, 4], [5, 7], [8, 9]]
    padded = lambda batches: sum(len(b) * max(len(r.input_ids) for r in b) for b in batches)
    assert padded(grouped) < padded(window)


def test_a_grouped_step_trains_the_same_numbers(tmp_path, train_config, monkeypatch):
    """Two steps of batch 2 x accumulation 2 over rows of varied lengths, grouped (the default)
    and not (group_by_length: false)."""
    logs, moved = {}, []

    def recording(window):
        regrouped = group_by_length(window)
        moved.append(regrouped != window)
        return regrouped

    monkeypatch.setattr(engine, "group_by_length", recording)
    for grouped in (True, False):
        out = tmp_path / f"grouped-{grouped}"
        config = train_config | {"output_dir": str(out), "per_device_train_batch_size": 2,
                                 "gradient_accumulation_steps": 2, "max_steps": 2,
                                 "group_by_length": grouped}
        assert main(["train", str(write_yaml(tmp_path / f"{out.name}.yaml", config))]) == 0
        logs[grouped] = read_log(out / "trainer_log.jsonl")
    assert len(moved) == 2 and any(moved)  # only the grouped run's steps; some rows moved
    for with_groups, without in zip(logs[True], logs[False]):
        assert with_groups["loss"] == pytest.approx(without["loss"], rel=1e-6)
        assert with_groups["grad_norm"] == pytest.approx(without["grad_norm"], rel=1e-5)


def test_group_by_length_is_refused_where_rows_are_pairs():
    with pytest.raises(ConfigError) as info:
        build_config({"stage": "dpo", "group_by_length": True})
    assert info.value.message == ("group_by_length applies only with stage: sft or pt, so it would "
                                  "be ignored here.")
