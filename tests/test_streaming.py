"""streaming: true: rows read, encoded and shuffled while training runs; the same rows as the cached
path, a bounded shuffle, honest accounting, refusals by name, and resume where the checkpoint left
off."""

from __future__ import annotations

import json
import random
import shutil
import tracemalloc
from itertools import islice
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.data import streaming
from lmtune.data.pipeline import prepare_data, training_rows
from lmtune.data.sources import mix
from lmtune.errors import ConfigError, DataError, LmtuneError
from tests.conftest import PAIRS, write_json, write_yaml

EOS = 2


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr("lmtune.data.cache.cache_dir", lambda: folder)
    return folder


def records(n: int, tag: str = "q") -> list[dict]:
    return [{"instruction": f"{tag} {i}: " + "word " * (i % 7), "output": f"answer {i} " * (1 + i % 5)}
            for i in range(n)]


def both(tokenizer, **values):
    """(the cached path's prepared data, the streaming path's) for the same keys."""
    values = {"cutoff_len": 48, **values}
    cached = prepare_data(build_config(values), tokenizer, [EOS])
    streamed = prepare_data(build_config(values | {"streaming": True, "max_steps": 10}), tokenizer, [EOS])
    return cached, streamed


# --- the same rows --------------------------------------------------------------------------------

def test_streamed_rows_are_the_cached_rows(tmp_path, tokenizer, cache_folder):
    # 300 records: more than one encoding chunk; a JSON list file and the same as JSON Lines.
    data = records(300)
    write_json(tmp_path / "d.json", data)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    cached, streamed = both(tokenizer, dataset=str(tmp_path / "d.json"))
    assert list(streamed.train.encoded()) == cached.train  # same ids, same label masks
    assert len(cached.train) == 300
    _, from_lines = both(tokenizer, dataset=str(tmp_path / "d.jsonl"))
    assert list(from_lines.train.encoded()) == cached.train
    entries = list(cache_folder.glob("*.safetensors"))
    assert len(entries) == 1  # the cached path's; streaming wrote none


def test_sharegpt_max_samples_and_concat(tmp_path, tokenizer):
    chats = [{"conversations": [{"from": "human", "value": f"hello {i}"},
                                {"from": "gpt", "value": f"hi {i} " * (i % 4 + 1)}]} for i in range(20)]
    write_json(tmp_path / "chats.json", chats)
    write_json(tmp_path / "d.json", records(20))
    write_json(tmp_path / "dataset_info.json", {"chats": {"file_name": "chats.json",
                                                          "formatting": "sharegpt"}})
    cached, streamed = both(tokenizer, dataset="chats,d.json", dataset_dir=str(tmp_path), max_samples=7)
    assert len(cached.train) == 14
    assert list(streamed.train.encoded()) == cached.train


@pytest.mark.parametrize("strategy, probs", [("concat", None), ("interleave_under", None),
                                             ("interleave_under", [0.2, 0.5, 0.3]),
                                             ("interleave_over", None),
                                             ("interleave_over", [0.6, 0.1, 0.3])])
def test_mixed_streams_draw_what_mix_draws(strategy, probs):
    datasets = [list(range(0, 5)), list(range(100, 112)), list(range(200, 203))]
    expected, _ = mix(datasets, strategy, probs, seed=7)
    streams = [lambda rows=rows: iter(rows) for rows in datasets]
    assert list(streaming.mix_streams(streams, strategy, probs, seed=7)) == expected


def test_val_size_takes_the_first_rows_and_training_skips_them(tmp_path, tokenizer):
    write_json(tmp_path / "d.json", records(12))
    cached, streamed = both(tokenizer, dataset=str(tmp_path / "d.json"))
    cfg = build_config({"dataset": str(tmp_path / "d.json"), "cutoff_len": 48, "streaming": True,
                        "max_steps": 3, "val_size": 3, "disable_shuffling": True})
    data = prepare_data(cfg, tokenizer, [EOS])
    assert data.val == cached.train[:3]
    assert list(data.train.encoded()) == cached.train[3:]
    assert [row for _, row in islice(data.train.passes(), 18)] == cached.train[3:] * 2
    report = data.report.to_dict()
    assert report["train"] is None and report["val"]["rows"] == 3
    assert report["datasets"] == [{"name": str(tmp_path / "d.json"), "file": str(tmp_path / "d.json"),
                                   "streamed": True}]
    assert any("not known up front" in line for line in data.report.lines())


def test_eval_datasets_are_loaded_whole_as_without_streaming(tmp_path, tokenizer):
    for name, n in (("d", 10), ("a", 3), ("b", 4)):
        write_json(tmp_path / f"{name}.json", records(n, tag=name))
    values = {"dataset": str(tmp_path / "d.json"), "cutoff_len": 48, "eval_on_each_dataset": True,
              "eval_dataset": f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"}
    cached = prepare_data(build_config(values), tokenizer, [EOS])
    streamed = prepare_data(build_config(values | {"streaming": True, "max_steps": 2}), tokenizer, [EOS])
    assert streamed.val == cached.val and len(cached.val) == 7
    assert streamed.val_groups == cached.val_groups == [("a", 3), ("b", 4)]
    assert list(streamed.train.encoded()) == cached.train


def test_pt_packs_documents_as_they_stream(tmp_path, tokenizer, tiny_model_dir):
    from transformers import AutoConfig

    lines = [f"Document {i} says " + "something plain " * (i % 9) for i in range(40)]
    (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n")
    values = {"dataset": str(tmp_path / "docs.txt"), "stage": "pt", "cutoff_len": 32,
              "disable_shuffling": True}
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    cached = prepare_data(build_config(values), tokenizer, [EOS])
    packed, _ = training_rows(cached, build_config(values), model_config)
    cfg = build_config(values | {"streaming": True, "max_steps": 5})
    data = prepare_data(cfg, tokenizer, [EOS])
    stream, _ = training_rows(data, cfg, model_config)
    assert list(stream.one_pass(0)) == packed
    assert all(len(r.input_ids) <= 32 for r in packed) and len(packed) > 5


# --- shuffling and memory -------------------------------------------------------------------------

def test_the_shuffle_buffer_is_seeded_and_bounded():
    consumed = []

    def source():
        for i in range(1000):
            consumed.append(i)
            yield i

    out = []
    for row in streaming.shuffle_buffer(source(), 50, random.Random(3)):
        out.append(row)
        assert len(consumed) - len(out) <= 50  # never more than the buffer is held back
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert list(streaming.shuffle_buffer(range(1000), 50, random.Random(3))) == out
    assert list(streaming.shuffle_buffer(range(1000), 50, random.Random(4))) != out
    assert list(streaming.shuffle_buffer(range(10), 1, random.Random(3))) == list(range(10))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_large_file_is_read_record_by_record(tmp_path, suffix):
    # 8,000 records of ~1.2 kB (about 10 MB): reading them all holds at most a block and a record.
    rows = [{"instruction": f"q{i} " + "x" * 1200, "output": str(i)} for i in range(8000)]
    path = tmp_path / f"big{suffix}"
    path.write_text(json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))
    del rows
    tracemalloc.start()
    try:
        count = 0
        for i, record in enumerate(streaming._file_records(path)):
            assert record["output"] == str(i)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 8000
    assert peak < 4 * 2**20 < path.stat().st_size / 2


def test_a_json_list_reads_across_blocks(tmp_path, monkeypatch):
    values = [{"a": [1, 2, {"b": "x, y]"}]}, 12345678, "text with ] and ,", [], {}, -0.5e3, None]
    path = tmp_path / "list.json"
    path.write_text("  [\n" + " ,\n".join(json.dumps(v) for v in values) + "\n]\n")
    monkeypatch.setattr(streaming, "READ_BLOCK", 3)
    assert list(streaming._file_records(path)) == values
    path.write_text('[{"a": 1} {"b": 2}]')
    with pytest.raises(DataError) as info:
        list(streaming._file_records(path))
    assert "after record 1" in info.value.message and str(path) in str(info.value)


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, words", [
    ({"max_steps": -1}, ["needs max_steps", "set max_steps"]),
    ({"val_size": 0.1}, ["val_size: 0.1", "row count"]),
    ({"stage": "dpo"}, ["stage dpo", "reference model"]),
    ({"stage": "kto"}, ["stage kto", "reference model"]),
    ({"stage": "ppo", "reward_model": "tests.ppo_rewards:letter_share"}, ["stage ppo"]),
    ({"tokenized_path": "tok"}, ["tokenized_path", "remove tokenized_path"]),
    ({"save_strategy": "epoch"}, ["save_strategy: epoch", "set save_strategy: steps"]),
])
def test_what_streaming_cannot_do_is_refused_by_name(values, words):
    with pytest.raises(ConfigError) as info:
        build_config({"streaming": True, "max_steps": 5, "dataset": "d.json"} | values)
    text = str(info.value)
    assert "streaming" in text and all(w in text for w in words)


def test_buffer_size_without_streaming_and_num_samples_are_refused(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="buffer_size: 64 is the shuffle buffer of streaming"):
        build_config({"buffer_size": 64})
    assert build_config({"buffer_size": 16384}).buffer_size == 16384  # LLaMA-Factory's default loads
    write_json(tmp_path / "d.json", records(5))
    write_json(tmp_path / "dataset_info.json", {"d": {"file_name": "d.json", "num_samples": 3}})
    cfg = build_config({"dataset": "d", "dataset_dir": str(tmp_path), "streaming": True, "max_steps": 2})
    with pytest.raises(LmtuneError) as info:
        prepare_data(cfg, tokenizer, [EOS])
    assert "num_samples" in str(info.value) and "max_samples" in info.value.fix


# --- plan and training ----------------------------------------------------------------------------

def test_plan_says_rows_are_not_known_up_front(tmp_path, train_config, capsys):
    config = train_config | {"streaming": True, "max_steps": 6, "gradient_accumulation_steps": 2}
    path = write_yaml(tmp_path / "plan.yaml", config)
    assert main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    s = plan["schedule"]
    assert (s["streaming"], s["train_rows"], s["steps_per_epoch"], s["optimizer_steps"],
            s["effective_batch"]) == (True, None, None, 6, 4)
    assert plan["data"]["train"] is None and plan["data"]["datasets"][0]["streamed"]
    assert main(["plan", str(path), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "not known up front" in out and "read 24 rows" in out and "== example 0" in out


def log_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "trainer_log.jsonl").read_text().splitlines()]


def test_a_resumed_stream_continues_after_the_trained_rows(tmp_path, train_config, cache_folder):
    # 8 rows, 2 per step: the 6 steps run into a second pass (read again, shuffled anew).
    config = train_config | {"streaming": True, "buffer_size": 4, "max_steps": 6, "save_steps": 3}
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    full_run = Path(config["output_dir"])
    full = log_of(full_run)
    assert [r["epoch"] for r in full] == [0.0] * 4 + [1.0] * 2
    results = json.loads((full_run / "all_results.json").read_text())
    assert "train_rows" not in results and results["train_tokens"] > 0
    assert json.loads((full_run / "data_report.json").read_text())["train"] is None
    assert not cache_folder.exists()  # nothing encoded was cached

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full_run / "checkpoint-3", interrupted / "checkpoint-3")
    (interrupted / "trainer_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in full if r["step"] <= 3))
    resumed = config | {"output_dir": str(interrupted), "resume_from_checkpoint": "auto"}
    assert main(["train", str(write_yaml(tmp_path / "resume.yaml", resumed))]) == 0
    again = log_of(interrupted)
    assert [r["loss"] for r in again] == [r["loss"] for r in full]
    assert json.loads((interrupted / "all_results.json").read_text())["train_tokens"] == \
        results["train_tokens"]


def test_rm_streams_its_pairs(tmp_path, tiny_model_dir):
    data = write_json(tmp_path / "data" / "pairs.json", PAIRS)
    write_json(tmp_path / "data" / "dataset_info.json", {"pairs": {"file_name": "pairs.json",
                                                                   "ranking": True}})
    config = {"model_name_or_path": tiny_model_dir, "stage": "rm", "dataset": "pairs",
              "dataset_dir": str(data.parent), "output_dir": str(tmp_path / "out"),
              "finetuning_type": "lora", "lora_rank": 4, "per_device_train_batch_size": 4,
              "learning_rate": 1e-3, "max_steps": 4, "logging_steps": 1, "streaming": True,
              "buffer_size": 8, "val_size": 2, "eval_strategy": "steps", "eval_steps": 4}
    assert main(["train", str(write_yaml(tmp_path / "rm.yaml", config))]) == 0
    log = log_of(tmp_path / "out")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    # 10 training pairs, 4 a step: the third step starts the second pass.
    assert [r["epoch"] for r in log if "loss" in r] == [0.0, 0.0, 1.0, 1.0]
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["val_rows"] == 2
