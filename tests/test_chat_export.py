"""Chat uses the training template token for token and stops at end-of-turn; export merges exactly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.data.encode import IGNORE_INDEX
from lmtune.data.formats import Conversation
from lmtune.infer.chat import ChatSession
from tests.conftest import write_json, write_yaml


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, tiny_model_dir) -> dict:
    """The tiny model fully fine-tuned until it answers one question with one sentence. (Its tiny
    random embeddings cap how peaked the logits can get, so LoRA alone cannot overfit it quickly.)"""
    root = tmp_path_factory.mktemp("overfit")
    data = write_json(root / "hi.json", [{"instruction": "Greet me.", "input": "",
                                          "output": "Hello from the tiny model."}] * 4)
    config = {"model_name_or_path": tiny_model_dir, "dataset": str(data),
              "output_dir": str(root / "out"), "finetuning_type": "full",
              "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 60,
              "lr_scheduler_type": "constant", "logging_steps": 10, "seed": 0,
              "max_new_tokens": 40}
    path = write_yaml(root / "run.yaml", config)
    assert main(["train", str(path)]) == 0
    return {"config": config, "yaml": path, "root": root}


def test_chat_answers_as_trained_and_stops_at_end_of_turn(overfit_run, capsys):
    # Greedy --prompt on the trained output_dir: exactly the trained reply, nothing after <|im_end|>.
    assert main(["chat", str(overfit_run["yaml"]), "--prompt", "Greet me."]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("Hello from the tiny model.")
    session = ChatSession.from_config(build_config(overfit_run["config"]))
    assert session.answer_once("Greet me.") == "Hello from the tiny model."
    # --base ignores the adapter: the random tiny model does not say it.
    base = ChatSession.from_config(build_config(overfit_run["config"]), use_trained=False)
    assert base.answer_once("Greet me.") != "Hello from the tiny model."


def test_chat_prompt_ids_equal_training_prefix(overfit_run):
    session = ChatSession.from_config(build_config(overfit_run["config"]))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Greet me."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again, please."},
                {"role": "assistant", "content": "Hello again."}]
    row, _ = session.encoder.encode(Conversation(messages))
    first_target_of_last_reply = max(i for i, label in enumerate(row.labels)
                                     if label != IGNORE_INDEX and row.labels[i - 1] == IGNORE_INDEX)
    assert session.encoder.prompt_ids(messages[:-1]) == row.input_ids[:first_target_of_last_reply]
    assert session.encoder.stop_ids == {session.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_prompts_file_counts_expected_answers(overfit_run, capsys, tmp_path):
    prompts = write_json(tmp_path / "prompts.json", [
        {"prompt": "Greet me.", "expect": "{{who}} model", "kind": "identity"},
        {"prompt": "Greet me.", "expect": "goodbye", "kind": "identity"}])
    saved = tmp_path / "answers.json"
    code = main(["chat", str(overfit_run["yaml"]), "data_vars.who=tiny", "--prompts", str(prompts),
                 "--save", str(saved)])
    assert code == 0
    assert "identity: 1/2 answers contain the expected text" in capsys.readouterr().out
    records = json.loads(saved.read_text())
    assert [r["hit"] for r in records] == [True, False]
    assert records[0]["output"] == "Hello from the tiny model."


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("lora")
    data = write_json(root / "hi.json", [{"instruction": "Greet me.", "input": "",
                                          "output": "Hello from the tiny model."}] * 4)
    config = {"model_name_or_path": tiny_model_dir, "dataset": str(data),
              "output_dir": str(root / "out"), "lora_rank": 8, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "max_steps": 5, "seed": 0}
    path = write_yaml(root / "run.yaml", config)
    assert main(["train", str(path)]) == 0
    return {"config": config, "yaml": path, "root": root}


def test_export_merges_to_the_same_logits(lora_run, tiny_model_dir):
    export_dir = lora_run["root"] / "merged"
    assert main(["export", str(lora_run["yaml"]), f"export_dir={export_dir}"]) == 0
    assert sorted(p.name for p in export_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(export_dir.glob("*.bin")) and (export_dir / "chat_template.jinja").is_file()

    ids = torch.tensor([[1, 9690, 198, 33, 42, 2, 198, 1, 4093]])
    merged = AutoModelForCausalLM.from_pretrained(export_dir)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        lora_run["config"]["output_dir"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected, got, plain = adapter(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the adapter is not a no-op


def test_export_refuses_a_foreign_non_empty_folder(lora_run, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    assert main(["export", str(lora_run["yaml"]), f"export_dir={target}"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (target / "keep.txt").exists()


def test_interactive_chat_streams_clears_and_exits(overfit_run, capsys, monkeypatch):
    typed = iter(["Greet me.", "clear", "Greet me.", "exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    assert main(["chat", str(overfit_run["yaml"]), "do_sample=false"]) == 0
    out = capsys.readouterr().out
    assert out.count("Hello from the tiny model.") == 2
    assert "(conversation cleared)" in out
    assert next(typed) == "never read"  # 'exit' ended the loop
