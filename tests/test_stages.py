"""Stages pt, rm, dpo and kto through `lmtune train` on the tiny model: each learns what it exists
for, logs its metrics, saves in the standard format, and the reference model stays fixed."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import ConfigError
from lmtune.train import dpo
from lmtune.train.checkpoint import COMPLETE_MARKER
from lmtune.train.logs import read_log
from lmtune.train.preference import collate_pairs, reference_reply_logps
from tests.conftest import ALPACA, PAIRS, QUESTIONS, train, write_json, write_yaml

KTO = [{"messages": [{"role": "user", "content": q},
                     {"role": "assistant", "content": "Yes." if i % 2 == 0 else "No."}],
        "label": i % 2 == 0} for i, q in enumerate(QUESTIONS)]
TEXT = [f"The river Alder runs past the town of Merrow number {i} and the mill." for i in range(40)]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    folder = tmp_path / "data"
    write_json(folder / "pairs.json", PAIRS)
    write_json(folder / "kto.json", KTO)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    write_json(folder / "dataset_info.json", {
        "pairs": {"file_name": "pairs.json", "ranking": True},
        "kto": {"file_name": "kto.json", "formatting": "openai", "columns": {"kto_tag": "label"}},
        "corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}})
    return folder


@pytest.fixture
def stage_config(tmp_path, tiny_model_dir, data_dir) -> dict:
    return {"model_name_or_path": tiny_model_dir, "dataset_dir": str(data_dir),
            "output_dir": str(tmp_path / "out"), "finetuning_type": "lora", "lora_rank": 4,
            "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 12,
            "logging_steps": 1, "save_steps": 100, "seed": 0, "val_size": 4,
            "eval_strategy": "steps", "eval_steps": 12, "plot_loss": True}


def full(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "lora_rank"} | {"finetuning_type": "full"}


def test_pt_reports_perplexity_and_packs_documents(tmp_path, stage_config):
    config = stage_config | {"stage": "pt", "dataset": "corpus", "cutoff_len": 64,
                             "per_device_train_batch_size": 2, "learning_rate": 5e-3}
    results = train(tmp_path, config)
    out = Path(config["output_dir"])
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-4)
    report = json.loads((out / "data_report.json").read_text())
    assert report["packing"]["rows"] < report["packing"]["samples"]  # documents share rows
    first = next(r for r in read_log(out / "trainer_log.jsonl") if "loss" in r)
    assert results["eval_loss"] < first["loss"]  # the repeated facts were learned
    for name in ("adapter_model.safetensors", "training_loss.png", "trainer_log.jsonl"):
        assert (out / name).is_file()


def test_reward_model_learns_to_rank_and_reloads_by_path(tmp_path, stage_config):
    from lmtune.train.rm import RewardModel

    config = stage_config | {"stage": "rm", "dataset": "pairs"}
    results = train(tmp_path, config)
    out = Path(config["output_dir"])
    assert results["eval_accuracy"] == 1.0 and results["eval_margin"] > 0
    logged = [r for r in read_log(out / "trainer_log.jsonl") if "accuracy" in r]
    assert len(logged) == 12 and {"margin", "loss"} <= set(logged[0])
    assert (out / "adapter_model.safetensors").is_file() and (out / "scalar_head.safetensors").is_file()

    reward = RewardModel(out)
    held_out = [[{"role": "user", "content": q}] for q in ("Is grass green?", "Do owls hoot?")]
    yes = reward.score(held_out, ["Yes.", "Yes."])
    no = reward.score(held_out, ["No.", "No."])
    assert all(y > n for y, n in zip(yes, no))

    assert main(["chat", str(tmp_path / "run.yaml"), "--prompt", "Hi"]) == 2  # it does not chat

    # Exported, the adapter is merged and the head goes with it: the same scores, standalone.
    export_dir = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run.yaml"), f"export_dir={export_dir}"]) == 0
    assert not (export_dir / "adapter_config.json").exists()
    assert RewardModel(export_dir).score(held_out, ["Yes.", "No."]) == pytest.approx(
        [yes[0], no[1]], abs=1e-4)


def test_reward_model_resumes_exactly(tmp_path, stage_config):
    config = full(stage_config) | {"stage": "rm", "dataset": "pairs", "learning_rate": 1e-3, "max_steps": 4, "save_steps": 2,
                             "eval_strategy": "no", "val_size": 0}
    train(tmp_path, config)
    out = Path(config["output_dir"])
    whole = load_file(out / "scalar_head.safetensors")
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()
    resumed = config | {"output_dir": str(tmp_path / "resumed")}
    shutil.copytree(out / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train(tmp_path, resumed | {"resume_from_checkpoint": "auto"})
    again = load_file(tmp_path / "resumed" / "scalar_head.safetensors")
    assert torch.equal(whole["weight"], again["weight"])
    # A fully fine-tuned reward model loads by path as well as a LoRA one.
    from lmtune.train.rm import RewardModel
    assert len(RewardModel(out).score([[{"role": "user", "content": "Is ice cold?"}]], ["Yes."])) == 1


@pytest.mark.parametrize("pref_loss", ["sigmoid", "ipo", "hinge", "orpo", "simpo"])
def test_dpo_family_learns_the_preference(tmp_path, stage_config, pref_loss):
    config = stage_config | {"stage": "dpo", "dataset": "pairs", "pref_loss": pref_loss}
    if pref_loss in ("sigmoid", "hinge"):
        config["pref_ftx"] = 0.1  # exercised on two losses; it must not stop the learning
    results = train(tmp_path, config)
    out = Path(config["output_dir"])
    first = next(r for r in read_log(out / "trainer_log.jsonl") if "reward_margin" in r)
    assert {"reward_accuracy", "reward_chosen", "reward_rejected"} <= set(first)
    assert results["eval_reward_accuracy"] == 1.0
    assert results["eval_reward_margin"] > first["reward_margin"]
    if pref_loss not in dpo.REFERENCE_FREE:
        # Before the first update the policy is the reference: every implicit reward is exactly 0.
        assert results["eval_reward_margin_start"] == 0 and results["eval_reward_accuracy_start"] == 0


def test_dpo_reference_is_the_starting_policy_and_stays_fixed(tmp_path, stage_config, tiny_model_dir,
                                                              monkeypatch):
    seen = {}
    real_fit = dpo.fit

    def spy(cfg, model, tokenizer, train_rows, *args, **kwargs):
        seen["rows"], seen["model"], seen["pad"] = train_rows, model, tokenizer.pad_token_id
        return real_fit(cfg, model, tokenizer, train_rows, *args, **kwargs)

    monkeypatch.setattr(dpo, "fit", spy)
    config = stage_config | {"stage": "dpo", "dataset": "pairs"}
    train(tmp_path, config)
    cfg = build_config(config)
    stored = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in seen["rows"]])

    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fresh = torch.tensor(reference_reply_logps(base, seen["rows"], collate_pairs, cfg, seen["pad"],
                                               "check"))
    assert torch.allclose(stored, fresh, atol=1e-4)  # the untouched base, computed before training
    trained = torch.tensor(reference_reply_logps(seen["model"].eval(), seen["rows"], collate_pairs,
                                                 cfg, seen["pad"], "check"))
    assert (trained - fresh).abs().max() > 0.1  # while the policy itself moved


def test_dpo_with_ref_model(tmp_path, stage_config, tiny_model_dir):
    config = full(stage_config) | {"stage": "dpo", "dataset": "pairs", "ref_model": tiny_model_dir,
                                   "learning_rate": 1e-3}
    results = train(tmp_path, config)
    assert results["eval_reward_accuracy"] == 1.0


def test_kto_separates_desirable_from_undesirable(tmp_path, stage_config):
    config = stage_config | {"stage": "kto", "dataset": "kto", "kto_rejected_weight": 1.5}
    results = train(tmp_path, config)
    assert results["eval_reward_desirable"] > 0 > results["eval_reward_undesirable"]
    assert results["eval_reward_desirable_start"] == 0 == results["eval_reward_undesirable_start"]
    records = read_log(Path(config["output_dir"]) / "trainer_log.jsonl")
    assert all(r["kl"] >= 0 for r in records if "kl" in r)


@pytest.mark.parametrize("values, words", [
    ({"stage": "sft", "pref_beta": 0.2}, "pref_beta applies to stage dpo or kto, but stage is sft"),
    ({"stage": "dpo", "kto_chosen_weight": 2.0}, "kto_chosen_weight applies to stage kto"),
    ({"stage": "ppo"}, "stage ppo needs reward_model"),
    ({"stage": "rm", "finetuning_type": "prefix"}, "finetuning_type: prefix is not supported"),
    ({"stage": "dpo", "pref_loss": "simpo", "ref_model": "default"}, "uses no reference model"),
])
def test_stage_keys_are_refused_where_they_would_be_ignored(values, words):
    with pytest.raises(ConfigError) as info:
        build_config({"dataset": "x", "output_dir": "out"} | values)
    assert words in info.value.message


def test_eval_dataset_is_the_val_split(tmp_path, stage_config, data_dir):
    write_json(data_dir / "held_out.json", PAIRS[:3])
    config = {k: v for k, v in stage_config.items() if k != "val_size"} | {
        "stage": "rm", "dataset": "pairs", "eval_dataset": str(data_dir / "held_out.json"),
        "max_steps": 2}
    results = train(tmp_path, config)
    assert (results["train_rows"], results["val_rows"]) == (len(PAIRS), 3)
    report = json.loads((Path(config["output_dir"]) / "data_report.json").read_text())
    assert [d["name"] for d in report["datasets"]] == ["pairs", f"{data_dir / 'held_out.json'} (eval)"]
    with pytest.raises(ConfigError, match="eval_dataset and val_size"):
        build_config(config | {"val_size": 0.1})


def test_reward_model_with_frozen_layers_trains_the_head_and_the_last_layer(tmp_path, stage_config):
    config = {k: v for k, v in stage_config.items() if k != "lora_rank"} | {
        "stage": "rm", "dataset": "pairs", "finetuning_type": "freeze", "freeze_trainable_layers": 1,
        "max_steps": 3, "eval_strategy": "no", "val_size": 0}
    results = train(tmp_path, config)
    out = Path(config["output_dir"])
    head = load_file(out / "scalar_head.safetensors")
    assert head["weight"].shape[-1] == 64 and (out / "model.safetensors").is_file()
    # The last decoder layer and the head train; everything below stays frozen.
    assert 0 < results["trainable_params"] < results["total_params"] / 2


@pytest.mark.parametrize("values, ok", [
    ({"reward_model_type": "lora"}, True), ({"reward_model_type": "full"}, True),
    ({"pref_bco_weight": 0.0}, True), ({"ref_model_adapters": None}, True),
    ({"reward_model_type": "api"}, False), ({"pref_bco_weight": 0.5}, False),
    ({"ld_alpha": 0.5}, False), ({"ref_model_adapters": "saves/a"}, False),
])
def test_llamafactory_stage_keys_run_unchanged_or_are_refused_with_a_fix(values, ok):
    base = {"stage": "ppo", "reward_model": "saves/rm", "dataset": "x", "output_dir": "out"}
    if ok:
        assert build_config(base | values).stage == "ppo"
        return
    with pytest.raises(ConfigError) as info:
        build_config(base | values)
    key = next(iter(values))
    assert f"{key}: {values[key]!r} is a LLaMA-Factory feature lmtune does not have" in info.value.message
    assert info.value.fix


@pytest.mark.parametrize("stage", ["dpo", "ppo"])
def test_a_reference_with_another_tokenizer_is_refused(stage, tmp_path, stage_config, tiny_model_dir,
                                                        tokenizer, capsys):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<only-here>"])
    changed.save_pretrained(other)
    config = stage_config | {"stage": stage, "dataset": "pairs", "ref_model": str(other)}
    if stage == "ppo":
        config |= {"dataset": str(write_json(tmp_path / "prompts.json", ALPACA)),
                   "reward_model": "tests.ppo_rewards:letter_share",
                   "max_new_tokens": 4, "eval_strategy": "no"}
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert f"ref_model {other} has another tokenizer" in err and "Traceback" not in err
