"""Predict: batched generation equals one-by-one, every file is written with LLaMA-Factory's names,
the train YAML keys route to it, and the replay guard's answers are cached and counted."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.data import replay
from lmtune.data.formats import Conversation
from lmtune.data.pipeline import prepare_data
from lmtune.errors import ConfigError
from lmtune.evaluate.predict import (PREDICTIONS_FILE, RESULTS_FILE, Generation, generate_batched,
                                     prompt_and_label, score_rows)
from lmtune.models.load import stop_token_ids
from tests.conftest import ALPACA, write_json, write_yaml

METRICS = {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l",
           "predict_exact_match", "predict_samples", "predict_runtime",
           "predict_samples_per_second", "predict_tokens_per_second"}


def test_batched_generation_equals_one_by_one(tiny, tokenizer):
    model, encoder = tiny
    prompts = [encoder.prompt_ids([{"role": "user", "content": text}])
               for text in ("Hi.", "Tell me a long story about a dragon and a knight.", "2+2?",
                            "What is the capital of a country far away from here?")]
    settings = Generation(max_new_tokens=12)
    stops = sorted(encoder.stop_ids)
    batched, timing = generate_batched(model, tokenizer.pad_token_id, prompts, settings, stops, 4)
    single, _ = generate_batched(model, tokenizer.pad_token_id, prompts, settings, stops, 1)
    assert batched == single
    for prompt, answer in zip(prompts, batched):  # and each equals a plain generate() of its own
        out = model.generate(input_ids=torch.tensor([prompt]), **settings.kwargs(stops, 2))
        assert answer == out[0, len(prompt):].tolist()[: len(answer)]
        assert len(answer) == 12 or answer[-1] in encoder.stop_ids
    assert timing["new_tokens"] == sum(len(a) for a in batched)


def test_prompt_and_label_split_before_the_last_reply(tiny):
    _, encoder = tiny
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    row, _ = encoder.encode(Conversation(messages))
    prompt, label = prompt_and_label(row)
    assert prompt == encoder.prompt_ids(messages[:-1])
    assert encoder.tokenizer.decode(label, skip_special_tokens=True) == "Green."


def test_score_rows_for_the_training_loop(tiny, tokenizer):
    model, encoder = tiny
    rows = [encoder.encode(Conversation([{"role": "user", "content": r["instruction"]},
                                         {"role": "assistant", "content": r["output"]}]))[0]
            for r in ALPACA[:3]]
    model.train()
    scores = score_rows(model, tokenizer, rows, sorted(encoder.stop_ids), Generation(max_new_tokens=4),
                        batch_size=2)
    assert model.training  # the loop's mode is given back
    assert set(scores) == {"eval_bleu-4", "eval_rouge-1", "eval_rouge-2", "eval_rouge-l",
                           "eval_exact_match"}
    model.eval()


def test_predict_writes_every_file_with_base_side_by_side(tmp_path, tiny_model_dir, random_adapter,
                                                          alpaca_file, capsys):
    out = tmp_path / "predict"
    config = write_yaml(tmp_path / "predict.yaml", {
        "model_name_or_path": tiny_model_dir, "adapter_name_or_path": random_adapter,
        "eval_dataset": str(alpaca_file), "output_dir": str(out), "max_new_tokens": 6,
        "per_device_eval_batch_size": 3, "do_predict": True, "predict_with_generate": True})
    assert main(["predict", str(config), "--compare-base"]) == 0
    printed = capsys.readouterr().out
    assert "predict_bleu-4" in printed and "base" in printed
    for folder in (out, out / "base"):
        rows = [json.loads(line) for line in (folder / PREDICTIONS_FILE).read_text().splitlines()]
        assert len(rows) == len(ALPACA)
        assert all(set(r) == {"prompt", "predict", "label"} for r in rows)
        assert [r["label"] for r in rows] == [r["output"] for r in ALPACA]  # dataset order kept
        assert rows[3]["prompt"].count("<|im_start|>user") == 2  # history is part of the prompt
        assert set(json.loads((folder / RESULTS_FILE).read_text())) == METRICS
    adapted = [json.loads(line)["predict"] for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    base = [json.loads(line)["predict"] for line in (out / "base" / PREDICTIONS_FILE).read_text().splitlines()]
    assert adapted != base  # the adapter was switched off for the base


def test_train_with_do_train_false_only_predicts(tmp_path, tiny_model_dir, alpaca_file):
    out = tmp_path / "only"
    config = write_yaml(tmp_path / "p.yaml", {
        "model_name_or_path": tiny_model_dir, "eval_dataset": str(alpaca_file), "output_dir": str(out),
        "do_train": False, "do_predict": True, "max_new_tokens": 3})
    assert main(["train", str(config)]) == 0
    assert (out / PREDICTIONS_FILE).is_file() and (out / RESULTS_FILE).is_file()
    assert not (out / "adapter_config.json").exists()


def test_do_predict_after_training_uses_the_saved_run(tmp_path, train_config, alpaca_file):
    train_config |= {"do_predict": True, "eval_dataset": str(alpaca_file), "max_new_tokens": 3,
                     "max_steps": 2}
    assert main(["train", str(write_yaml(tmp_path / "t.yaml", train_config))]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["predict_samples"] == len(ALPACA)


def test_predict_refusals(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(ConfigError, match="predict_with_generate"):
        build_config({"do_predict": True, "predict_with_generate": False})
    with pytest.raises(ConfigError, match="stage dpo"):
        build_config({"do_predict": True, "stage": "dpo"})
    with pytest.raises(ConfigError, match="length_penalty"):
        build_config({"length_penalty": 2.0})
    assert main(["predict", "x.yaml"]) == 2  # a missing file is one message
    assert main(["predict", f"model_name_or_path={tiny_model_dir}", f"output_dir={tmp_path}"]) == 2
    assert "needs eval_dataset" in capsys.readouterr().err


# --- replay ---------------------------------------------------------------------------------------

def test_replay_config_checks():
    with pytest.raises(ConfigError, match="not true/false"):
        build_config({"replay": True})
    with pytest.raises(ConfigError, match="asks for no general prompts"):
        build_config({"replay": 0})
    with pytest.raises(ConfigError, match="stage dpo"):
        build_config({"replay": 5, "stage": "dpo"})
    with pytest.raises(ConfigError, match="more than the 100 built-in"):
        replay.replay_prompts(build_config({"replay": 101}))


def test_replay_answers_are_generated_once_then_cached_and_counted(tmp_path, monkeypatch,
                                                                   tiny_model_dir, tokenizer,
                                                                   alpaca_file):
    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(replay, "MAX_NEW_TOKENS", 5)
    prompts = write_json(tmp_path / "general.json", [{"prompt": "Say yes."}, {"prompt": "Say no."},
                                                     {"prompt": "Count to {{n}}."}])
    cfg = build_config({"model_name_or_path": tiny_model_dir, "dataset": str(alpaca_file),
                        "replay": str(prompts), "data_vars": {"n": "3"}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = prepare_data(cfg, tokenizer, stop_token_ids(tokenizer, model), model)
    cached = list((tmp_path / "home" / "replay").glob("*.json"))
    assert len(cached) == 1
    answers = json.loads(cached[0].read_text())
    assert [a["prompt"] for a in answers] == ["Say yes.", "Say no.", "Count to 3."]
    # Make the answers look like a real base's: two finished, one cut off at the token limit.
    answers[0] |= {"answer": "Yes.", "finished": True}
    answers[1] |= {"answer": "No.", "finished": True}
    answers[2] |= {"answer": "One, two", "finished": False}
    cached[0].write_text(json.dumps(answers))

    def no_generation(*args, **kwargs):
        raise AssertionError("answers were generated again")

    monkeypatch.setattr(replay, "_generate", no_generation)
    data = prepare_data(cfg, tokenizer, stop_token_ids(tokenizer, model))  # no model: cache only
    counts = data.report.datasets[-1]
    assert (counts.name, counts.found, counts.kept, counts.dropped_unfinished) == ("replay", 3, 2, 1)
    assert len(data.train) == len(ALPACA) + 2
    assert "records: 3 found, 2 kept (dropped: 1 unfinished)" in "\n".join(data.report.lines())
    assert any("from the cache" in note for note in data.report.notes)
    replayed = [tokenizer.decode(row.input_ids) for row in data.train[-2:]]
    assert "Say yes." in replayed[0] and "Yes.<|im_end|>" in replayed[0]
