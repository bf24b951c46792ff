"""Sources (every file type, folders, saved and hub datasets), sampling, bad records and mixing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmtune.config import build_config
from lmtune.data.sources import load_conversations, mix
from lmtune.errors import ConfigError, DataError
from tests.conftest import write_json


def numbered(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"} for i in range(n)]


def load(tmp_path: Path, dataset: str, info: dict | None = None, **cfg):
    if info is not None:
        write_json(tmp_path / "dataset_info.json", info)
    return load_conversations(build_config({"dataset": dataset, "dataset_dir": str(tmp_path), **cfg}))


def answers(convs) -> list[str]:
    return [c.messages[-1]["content"] for c in convs]


# --- file types ---------------------------------------------------------------------------------

def write_table(path: Path, records: list[dict]) -> Path:
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet

    table = pyarrow.Table.from_pylist(records)
    if path.suffix == ".parquet":
        pyarrow.parquet.write_table(table, path)
    elif path.name.endswith(".file.arrow"):
        with pyarrow.ipc.new_file(path, table.schema) as writer:
            writer.write_table(table)
    else:
        with pyarrow.ipc.new_stream(path, table.schema) as writer:
            writer.write_table(table)
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


@pytest.mark.parametrize("name", ["d.csv", "d.parquet", "d.arrow", "d.file.arrow", "d.jsonl", "d.json"])
def test_every_file_type_gives_the_same_conversations(tmp_path, name):
    records = numbered("x", 5) + [{"instruction": "Quote \"this\", please", "output": "Line one\nline two"}]
    path = tmp_path / name
    if name.endswith(".csv"):
        write_csv(path, records)
    elif name.endswith((".parquet", ".arrow")):
        write_table(path, records)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        write_json(path, records)
    convs, report = load(tmp_path, str(path), max_samples=6)
    assert answers(convs) == [r["output"] for r in records]
    assert convs[-1].messages[0]["content"] == 'Quote "this", please'
    assert report.datasets[0].found == 6


def test_folder_of_files_reads_them_in_name_order_and_names_the_file_of_a_bad_record(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in numbered("b", 2)))
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in numbered("a", 3)))
    convs, report = load(tmp_path, "parts", {"parts": {"file_name": "parts"}})
    assert answers(convs) == [f"a answer {i}" for i in range(3)] + ["b answer 0", "b answer 1"]
    assert report.datasets[0].found == 5
    (folder / "b.jsonl").write_text(json.dumps(numbered("b", 1)[0]) + "\n" + json.dumps({"instruction": "x"}))
    with pytest.raises(DataError) as info:
        load(tmp_path, "parts")
    assert info.value.message.startswith(f"{folder / 'b.jsonl'}, record 1: missing field 'output'")


def test_folder_that_mixes_file_types_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_json(folder / "a.json", numbered("a", 1))
    write_csv(folder / "b.csv", numbered("b", 1))
    with pytest.raises(DataError, match=r"mixes file types \(csv, json\)"):
        load(tmp_path, str(folder))


@pytest.mark.parametrize("as_dict", [False, True])
def test_dataset_saved_with_the_datasets_library(tmp_path, as_dict):
    import datasets

    saved = datasets.Dataset.from_list(numbered("s", 4))
    if as_dict:
        saved = datasets.DatasetDict({"train": saved, "test": datasets.Dataset.from_list(numbered("t", 2))})
    saved.save_to_disk(str(tmp_path / "saved"))
    info = {"saved": {"file_name": "saved", "split": "test" if as_dict else "train"}}
    convs, report = load(tmp_path, "saved", info)
    assert answers(convs) == ([f"t answer {i}" for i in range(2)] if as_dict
                              else [f"s answer {i}" for i in range(4)])
    if as_dict:
        write_json(tmp_path / "dataset_info.json", {"saved": {"file_name": "saved", "split": "dev"}})
        with pytest.raises(DataError, match="has no split 'dev' \\(it has train, test\\)"):
            load(tmp_path, "saved")


def test_hub_entry_loads_through_the_datasets_library(tmp_path):
    # A local folder stands in for a hub repo: load_dataset reads both the same way, offline.
    repo = tmp_path / "someone-data"
    repo.mkdir()
    write_table(repo / "train.parquet", numbered("h", 3))
    convs, report = load(tmp_path, "hub", {"hub": {"hf_hub_url": str(repo)}})
    assert answers(convs) == [f"h answer {i}" for i in range(3)]
    assert report.datasets[0].file == str(repo)


def test_broken_parquet_and_csv_are_data_errors(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot be read as parquet") as info:
        load(tmp_path, str(tmp_path / "bad.parquet"))
    assert info.value.file == str(tmp_path / "bad.parquet") and info.value.fix


def test_jsonl_lines_beyond_max_samples_are_counted_not_parsed(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in numbered("a", 3)) + "{broken json\n")
    convs, report = load(tmp_path, str(path), max_samples=3)
    assert len(convs) == 3 and report.datasets[0].found == 4
    with pytest.raises(DataError, match="line 4 is not valid JSON"):
        load(tmp_path, str(path), max_samples=4)


# --- num_samples and max_samples ----------------------------------------------------------------

def test_num_samples_is_a_seeded_random_sample(tmp_path):
    write_json(tmp_path / "a.json", numbered("a", 20))
    info = {"a": {"file_name": "a.json", "num_samples": 5}}
    convs, report = load(tmp_path, "a", info)
    picked = answers(convs)
    assert len(picked) == len(set(picked)) == 5  # without replacement
    assert picked != [f"a answer {i}" for i in range(5)]  # random, not the first five
    assert answers(load(tmp_path, "a")[0]) == picked  # same seed, same sample
    assert answers(load(tmp_path, "a", seed=7)[0]) != picked
    d = report.datasets[0]
    assert (d.found, d.num_samples, d.dropped_by_num_samples, d.kept) == (20, 5, 15, 5)
    assert "num_samples=5 samples 5 of 20 records of a at random" in report.warnings()


def test_num_samples_beyond_the_dataset_draws_with_replacement_then_max_samples(tmp_path):
    write_json(tmp_path / "a.json", numbered("a", 4))
    convs, report = load(tmp_path, "a", {"a": {"file_name": "a.json", "num_samples": 10}})
    assert len(convs) == 10 and set(answers(convs)) == {f"a answer {i}" for i in range(4)}
    d = report.datasets[0]
    assert (d.repeated_by_num_samples, d.dropped_by_num_samples) == (6, 0)
    assert "num_samples=10 draws 10 rows from the 4 records of a: 6 are repeats" in report.warnings()
    capped, report = load(tmp_path, "a", max_samples=3)  # after num_samples, the first N
    assert answers(capped) == answers(convs)[:3]
    assert report.datasets[0].dropped_by_max_samples == 7


@pytest.mark.parametrize("value", [0, -3, "5", 2.5, True])
def test_num_samples_must_be_a_positive_count(tmp_path, value):
    write_json(tmp_path / "a.json", numbered("a", 4))
    with pytest.raises(DataError, match=f"entry 'a' has num_samples {value!r}"):
        load(tmp_path, "a", {"a": {"file_name": "a.json", "num_samples": value}})


# --- bad records --------------------------------------------------------------------------------

BAD = [{"instruction": "no answer"}, {"instruction": "q", "output": 5}, {"instruction": "", "output": "x"}]


def test_bad_records_are_listed_in_one_error(tmp_path):
    records = numbered("a", 10)
    for at, bad in zip((2, 5, 7), BAD):
        records[at] = bad
    path = write_json(tmp_path / "a.json", records)
    with pytest.raises(DataError) as info:
        load(tmp_path, str(path))
    err = info.value
    assert err.record == 2 and err.file == str(path)
    assert err.message == (
        f"{path}, record 2: missing field 'output' (alpaca format); 3 of 10 records are bad, also "
        "record 5: field 'output' must be text, got int; record 7: empty prompt: 'instruction' and "
        "'input' are both empty")
    assert "skip_bad_records: true" in err.fix


def test_skip_bad_records_skips_and_counts_them(tmp_path):
    records = numbered("a", 10)
    for at, bad in zip((2, 5, 7), BAD):
        records[at] = bad
    write_json(tmp_path / "a.json", records)
    convs, report = load(tmp_path, "a", {"a": {"file_name": "a.json"}}, skip_bad_records=True)
    assert len(convs) == 7 and "a answer 2" not in answers(convs)
    d = report.datasets[0]
    assert (d.found, d.bad, d.kept) == (10, 3, 7)
    assert d.bad_examples[0] == "record 2: missing field 'output'"
    assert len(d.bad_examples) == 3
    assert "skip_bad_records skipped 3 bad records of a (first: record 2: missing field 'output')" in (
        report.warnings())


def test_only_the_first_few_bad_records_are_listed(tmp_path):
    write_json(tmp_path / "a.json", [{"instruction": f"q{i}"} for i in range(40)])
    with pytest.raises(DataError) as info:
        load(tmp_path, "a", {"a": {"file_name": "a.json"}})
    assert "40 of 40 records are bad" in info.value.message
    assert info.value.message.count("missing field") == 5
    with pytest.raises(DataError, match="all 40 records are bad and were skipped"):
        load(tmp_path, "a", skip_bad_records=True)


# --- mixing -------------------------------------------------------------------------------------

def test_mix_concat_and_round_robin_interleaves():
    a, b = ["a0", "a1", "a2", "a3"], ["b0", "b1"]
    assert mix([a, b], "concat", None, 0) == (a + b, [4, 2])
    assert mix([a, b], "interleave_under", None, 0) == (["a0", "b0", "a1", "b1", "a2"], [3, 2])
    assert mix([a, b], "interleave_over", None, 0) == (
        ["a0", "b0", "a1", "b1", "a2", "b0", "a3"], [4, 3])
    assert mix([a, [], b], "interleave_over", None, 0)[1] == [4, 0, 3]  # an emptied dataset sits out


def test_mix_with_probabilities_is_seeded_and_follows_them():
    a, b = [f"a{i}" for i in range(1000)], [f"b{i}" for i in range(1000)]
    rows, taken = mix([a, b], "interleave_under", [0.8, 0.2], seed=3)
    assert taken[0] == 1000 and 150 < taken[1] < 350  # stops when a runs out
    assert mix([a, b], "interleave_under", [0.8, 0.2], seed=3) == (rows, taken)
    assert [r for r in rows if r.startswith("b")] == b[: taken[1]]  # order within a dataset kept
    _, over = mix([a, b], "interleave_over", [0.8, 0.2], seed=3)
    assert over[1] == 1000 and over[0] > 3000  # until b is used whole; a repeats


@pytest.mark.parametrize("values, words", [
    ({"interleave_probs": "0.5,0.5"}, "mix_strategy is concat"),
    ({"mix_strategy": "interleave_under", "interleave_probs": "0.5"}, "1 values for 2 datasets"),
    ({"mix_strategy": "interleave_under", "interleave_probs": "0.5,0.6"}, "sum to 1"),
    ({"mix_strategy": "interleave_under", "interleave_probs": "a,b"}, "not a comma list of numbers"),
])
def test_interleave_probs_are_checked(values, words):
    with pytest.raises(ConfigError, match=words):
        build_config({"dataset": "a,b", **values})


def test_interleave_is_counted_and_warned_per_dataset(tmp_path, tokenizer, monkeypatch):
    from lmtune.data.pipeline import prepare_data

    monkeypatch.setattr("lmtune.data.cache.cache_dir", lambda: tmp_path / "cache")
    write_json(tmp_path / "a.json", numbered("a", 6))
    write_json(tmp_path / "b.json", numbered("b", 2))
    info = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}}
    write_json(tmp_path / "dataset_info.json", info)
    for strategy, mixed, warning in (
            ("interleave_under", [3, 2], "mix_strategy=interleave_under uses only 3 of the 6 rows of a"),
            ("interleave_over", [6, 5], "mix_strategy=interleave_over draws 5 rows from the 2 of b: 3 are "
                                        "repeats")):
        cfg = build_config({"dataset": "a,b", "dataset_dir": str(tmp_path), "mix_strategy": strategy})
        data = prepare_data(cfg, tokenizer, [2])
        assert [d.mixed for d in data.report.datasets] == mixed
        assert len(data.train) == sum(mixed)
        assert warning in data.report.warnings()
        assert f"the mix takes {mixed[0]}" in data.report.lines()[1]
