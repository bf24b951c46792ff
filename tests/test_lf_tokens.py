"""LLaMA-Factory's token and encoded-data keys on real runs of the tiny model: add_tokens and
add_special_tokens (tokenizer, embeddings and head grown, new rows trained, chat reloads them),
tokenized_path, eval_on_each_dataset."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmtune.config import build_config
from lmtune.data.pipeline import prepare_data
from lmtune.errors import ConfigError, DataError
from lmtune.export import export
from lmtune.infer.chat import ChatSession
from lmtune.models.load import load_tokenizer
from tests.conftest import ALPACA, train, write_json

NEW = "<|calc|>"
WORD = "zorbleflux"


def test_added_tokens_encode_whole_train_their_rows_and_chat_reloads_them(tmp_path, train_config):
    rows = [dict(r, output=f"{NEW} {r['output']} {WORD}") for r in ALPACA]
    config = train_config | {"dataset": str(write_json(tmp_path / "data" / "calc.json", rows)),
                             "add_special_tokens": NEW, "add_tokens": WORD, "save_steps": 1,
                             "max_steps": 3, "learning_rate": 1e-2}
    train(tmp_path, config)
    out = Path(config["output_dir"])

    tokenizer = load_tokenizer(str(out))
    new_id, word_id = tokenizer.convert_tokens_to_ids([NEW, WORD])
    assert tokenizer.encode(f"a {NEW}b {WORD}", add_special_tokens=False).count(new_id) == 1
    assert word_id in tokenizer.encode(f"a {WORD} b", add_special_tokens=False)
    assert new_id >= 49152 and word_id >= 49152  # past the base's vocabulary

    # LoRA: the grown embeddings train in full and are saved with the adapter (modules_to_save).
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert "model.embed_tokens" in adapter_config["modules_to_save"]
    weights = load_file(out / "adapter_model.safetensors")
    # The trained embedding and head, without the base's own copies of them.
    assert sorted(k for k in weights if "lora_" not in k) == [
        "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    embed_key = "base_model.model.model.embed_tokens.weight"
    assert weights[embed_key].shape[0] == 49152 + 64  # rounded up to a multiple of 64
    first = load_file(out / "checkpoint-1" / "adapter_model.safetensors")[embed_key]
    assert not torch.allclose(first[new_id], weights[embed_key][new_id])  # the new row learned
    head_key = embed_key.replace("model.embed_tokens", "lm_head")
    assert torch.equal(weights[head_key], weights[embed_key])  # the tied head trained as one

    session = ChatSession.from_config(build_config(config))
    assert session.tokenizer.convert_tokens_to_ids(NEW) == new_id
    embed = session.model.get_input_embeddings()
    assert torch.allclose(embed(torch.tensor([new_id]))[0], weights[embed_key][new_id])
    session.answer_once("Say hi.")

    # The tied head trained as one with the embedding, so a merged export keeps the new rows.
    export(build_config(config | {"export_dir": str(tmp_path / "merged")}))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[new_id, word_id, 42]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, session.model(ids).logits, atol=1e-5)
    assert load_tokenizer(str(tmp_path / "merged")).convert_tokens_to_ids(WORD) == word_id



def test_tokenized_path_saves_the_rows_and_a_later_run_trains_without_the_data_files(
        tmp_path, train_config, tokenizer):
    saved = tmp_path / "tokenized"
    config = train_config | {"tokenized_path": str(saved), "val_size": 2, "max_steps": 2}
    first = train(tmp_path, config)
    assert (saved / "tokenized.json").is_file()
    Path(config["dataset"]).unlink()

    again = config | {"output_dir": str(tmp_path / "again")}
    second = train(tmp_path, again)
    assert second["train_rows"] == first["train_rows"] and second["val_rows"] == first["val_rows"] == 2
    assert second["train_loss"] == first["train_loss"]  # the same rows in the same order
    report = json.loads((tmp_path / "again" / "data_report.json").read_text())
    assert any("tokenized_path" in note for note in report["notes"])

    # Rows encoded otherwise than this run asks are refused with the difference.
    with pytest.raises(DataError) as info:
        prepare_data(build_config(again | {"cutoff_len": 64}), tokenizer, [tokenizer.eos_token_id])
    assert "cutoff_len: 2048 then, 64 now" in info.value.message
    with pytest.raises(DataError, match="another tokenizer"):
        grown = copy.deepcopy(tokenizer)
        grown.add_tokens([WORD])
        prepare_data(build_config(again), grown, [tokenizer.eos_token_id])



def test_eval_on_each_dataset_scores_each_eval_set_beside_the_combined_one(tmp_path, train_config):
    first = write_json(tmp_path / "data" / "greet.json", ALPACA[:3])
    second = write_json(tmp_path / "data" / "count.json", ALPACA[4:8])
    config = train_config | {"eval_dataset": f"{first},{second}", "eval_on_each_dataset": True,
                             "eval_strategy": "steps", "eval_steps": 2, "max_steps": 2}
    results = train(tmp_path, config)
    greet, count = results["eval_greet_loss"], results["eval_count_loss"]
    assert greet != count and min(greet, count) <= results["eval_loss"] <= max(greet, count)
    log = [json.loads(line) for line in
           (Path(config["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    assert any("eval_greet_loss" in r and "eval_count_loss" in r for r in log)

    with pytest.raises(ConfigError, match="no eval_dataset is set"):
        build_config(train_config | {"eval_on_each_dataset": True, "val_size": 2})


def test_a_full_fine_tune_saves_the_grown_model_with_its_tokenizer(tmp_path, train_config):
    config = {k: v for k, v in train_config.items() if k != "lora_rank"}
    config |= {"finetuning_type": "full", "add_special_tokens": NEW, "max_steps": 1}
    train(tmp_path, config)
    session = ChatSession.from_config(build_config(config))
    new_id = session.tokenizer.convert_tokens_to_ids(NEW)
    assert new_id == 49152 and session.model.get_input_embeddings().weight.shape[0] == 49152 + 64
    assert session.tokenizer.decode([new_id], skip_special_tokens=True) == ""  # a special token
