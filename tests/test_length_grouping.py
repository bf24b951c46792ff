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
from tests.conftest import write_json, write_yaml


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

    def recording(window, length):
        regrouped = group_by_length(window, length)
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


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_a_grouped_step_of_pairs_trains_the_same_numbers(tmp_path, stage, tiny_model_dir, monkeypatch):
    """rm and dpo sum their loss pair by pair: grouping pairs by length changes no number."""
    folder = tmp_path / "data"
    # pairs of clearly different lengths, so that grouping moves some
    pairs = [{"instruction": "Say it " + "again " * (i % 5) * 6, "input": "",
              "chosen": "yes " * (1 + i % 3), "rejected": "no " * (1 + (i * 7) % 4)} for i in range(8)]
    write_json(folder / "pairs.json", pairs)
    write_json(folder / "dataset_info.json", {"pairs": {"file_name": "pairs.json", "ranking": True}})
    moved = []

    def recording(window, length):
        regrouped = group_by_length(window, length)
        moved.append(regrouped != window)
        return regrouped

    monkeypatch.setattr(engine, "group_by_length", recording)
    logs = {}
    for grouped in (True, False):
        out = tmp_path / f"{stage}-{grouped}"
        config = {"model_name_or_path": tiny_model_dir, "stage": stage, "dataset": "pairs",
                  "dataset_dir": str(folder), "output_dir": str(out), "finetuning_type": "lora",
                  "lora_rank": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                  "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "seed": 0,
                  "plot_loss": False, "group_by_length": grouped}
        assert main(["train", str(write_yaml(tmp_path / f"{out.name}.yaml", config))]) == 0
        logs[grouped] = read_log(out / "trainer_log.jsonl")
    assert len(moved) == 2 and any(moved)
    for with_groups, without in zip(logs[True], logs[False]):
        assert with_groups["loss"] == pytest.approx(without["loss"], rel=1e-6)
        assert with_groups["grad_norm"] == pytest.approx(without["grad_norm"], rel=1e-5)


def test_group_by_length_is_refused_where_a_batch_shares_an_estimate():
    with pytest.raises(ConfigError) as info:
        build_config({"stage": "kto", "group_by_length": True})
    assert info.value.message == ("group_by_length applies only with stage: sft, pt, rm or dpo, so it "
                                  "would be ignored here.")
