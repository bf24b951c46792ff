"""The encoded-data cache (hit, rebuild, what invalidates it) and parallel encoding."""

from __future__ import annotations

import copy

import pytest

from lmtune.config import build_config
from lmtune.data import cache
from lmtune.data.encode import (KEPT, NO_TARGET, OVER_LONG, TRUNCATED, ChatEncoder, EncodedRow, KTORow,
                                PreferenceRow)
from lmtune.data.pipeline import prepare_data
from tests.conftest import write_json

EOS = 2


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(cache, "cache_dir", lambda: folder)
    return folder


def records(n: int, tag: str = "q") -> list[dict]:
    return [{"instruction": f"{tag} {i}: " + "word " * (i % 7), "output": f"answer {i} " * (1 + i % 5)}
            for i in range(n)]


def prepare(tmp_path, tokenizer, **values):
    cfg = build_config({"dataset": str(tmp_path / "d.json"), "cutoff_len": 48, **values})
    return prepare_data(cfg, tokenizer, [EOS])


def test_second_run_reads_the_cache_without_encoding(tmp_path, tokenizer, cache_folder, monkeypatch):
    write_json(tmp_path / "d.json", records(30))
    first = prepare(tmp_path, tokenizer)
    assert first.report.datasets[0].cache == "built"
    assert len(list(cache_folder.glob("*.safetensors"))) == 1

    def no_encoding(self, records):
        raise AssertionError("encoded although the cache holds the rows")

    monkeypatch.setattr(ChatEncoder, "encode_records", no_encoding)
    second = prepare(tmp_path, tokenizer)
    assert second.report.datasets[0].cache == "hit"
    assert second.train == first.train
    hit, built = second.report.to_dict(), first.report.to_dict()
    hit["datasets"][0].pop("cache"), built["datasets"][0].pop("cache")
    assert hit == built  # every count is the same from the cache
    with pytest.raises(AssertionError, match="encoded although"):
        prepare(tmp_path, tokenizer, overwrite_cache=True)


@pytest.mark.parametrize("change", ["data", "cutoff_len", "cutoff_policy", "mask_history",
                                    "data_vars", "max_samples", "template", "vocabulary"])
def test_what_changes_the_rows_invalidates_the_entry(tmp_path, tokenizer, change):
    rows = records(20)
    rows[0]["output"] = "I am {{name}}."
    write_json(tmp_path / "d.json", rows)
    values = {"data_vars": {"name": "Orrin"}}
    assert prepare(tmp_path, tokenizer, **values).report.datasets[0].cache == "built"
    assert prepare(tmp_path, tokenizer, **values).report.datasets[0].cache == "hit"
    tok = tokenizer
    if change == "data":
        write_json(tmp_path / "d.json", rows[:-1])
    elif change == "cutoff_len":
        values["cutoff_len"] = 40
    elif change == "cutoff_policy":
        values["cutoff_policy"] = "drop"
    elif change == "mask_history":
        values["mask_history"] = True
    elif change == "data_vars":
        values["data_vars"] = {"name": "Zephyra"}
    elif change == "max_samples":
        values["max_samples"] = 10
    elif change == "template":
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = tokenizer.chat_template.replace("You are a helpful", "You are a kind")
    else:
        tok = copy.deepcopy(tokenizer)
        tok.add_tokens(["<|brand-new|>"])
    assert prepare(tmp_path, tok, **values).report.datasets[0].cache == "built"


def test_a_damaged_entry_is_rebuilt(tmp_path, tokenizer, cache_folder):
    write_json(tmp_path / "d.json", records(10))
    built = prepare(tmp_path, tokenizer)
    [entry] = cache_folder.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:50])
    again = prepare(tmp_path, tokenizer)
    assert again.report.datasets[0].cache == "built" and again.train == built.train


def test_round_trip_of_every_row_kind_and_status(cache_folder):
    for results in (
        [(EncodedRow([1, 2, 3], [-100, 2, 3]), KEPT), (None, NO_TARGET), (EncodedRow([4], [4]), TRUNCATED)],
        [(PreferenceRow([1, 2], [3], [3], [4, 5], [-100, 5]), KEPT), (None, OVER_LONG)],
        [(KTORow([1], [2, 3], [2, 3], False), KEPT), (KTORow([1], [4], [4], True), TRUNCATED)],
        [(None, OVER_LONG), (None, NO_TARGET)],
    ):
        cache.save("k", results)
        assert cache.load("k") == results
    assert cache.load("missing") is None


def test_parallel_encoding_equals_one_process(tmp_path, tokenizer):
    write_json(tmp_path / "d.json", records(700))  # three chunks of 256
    one = prepare(tmp_path, tokenizer)
    two = prepare(tmp_path, tokenizer, preprocessing_num_workers=2, overwrite_cache=True)
    assert two.report.datasets[0].cache == "built"
    assert two.train == one.train and two.val == one.val
    statuses = one.report.datasets[0]
    assert statuses.truncated > 0 and statuses.kept == 700 - statuses.dropped_no_target
