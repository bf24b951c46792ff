"""The shared loop through `lmtune train`: accumulation, methods, outputs, checkpoints, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmtune.cli import main
from lmtune.train.checkpoint import COMPLETE_MARKER
from lmtune.train.logs import read_log
from tests.conftest import write_yaml


def train(tmp_path: Path, config: dict, name: str = "run.yaml") -> int:
    return main(["train", str(write_yaml(tmp_path / name, config))])


def log_of(output_dir) -> list[dict]:
    return read_log(Path(output_dir) / "trainer_log.jsonl")


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_accumulation_gives_same_loss_and_gradients(tmp_path, train_config, finetuning_type):
    """8 rows of different lengths as 8x1, 1x8 and 2x4: one window, same loss and gradient norm."""
    first_steps = []
    for batch, accumulation in ((8, 1), (1, 8), (2, 4)):
        out = tmp_path / f"out-{batch}x{accumulation}"
        config = train_config | {"output_dir": str(out), "finetuning_type": finetuning_type,
                                 "per_device_train_batch_size": batch,
                                 "gradient_accumulation_steps": accumulation, "max_steps": 1}
        if finetuning_type == "full":
            config.pop("lora_rank")
        assert train(tmp_path, config) == 0
        first_steps.append(log_of(out)[0])
    for other in first_steps[1:]:
        assert other["loss"] == pytest.approx(first_steps[0]["loss"], rel=1e-5)
        assert other["grad_norm"] == pytest.approx(first_steps[0]["grad_norm"], rel=1e-4)
    assert first_steps[0]["grad_norm"] > 0


def test_lora_run_writes_peft_adapter_and_outputs(tmp_path, train_config, tiny_model_dir):
    config = train_config | {"val_size": 2, "eval_strategy": "steps", "eval_steps": 2}
    assert train(tmp_path, config) == 0
    out = Path(config["output_dir"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_log.jsonl",
                 "training_loss.png", "all_results.json", "run_config.yaml", "data_report.json",
                 "chat_template.jinja", "tokenizer.json"):
        assert (out / name).is_file(), name
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    assert sorted(adapter_cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()), "B never left zero"

    records = log_of(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "epoch"} <= set(records[1])
    # The val split is measured before the first update too: the baseline for the rest.
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 4 and results["train_rows"] == 6 and results["val_rows"] == 2
    assert results["trainable_params"] < results["total_params"]
    assert results["eval_loss"] > 0 and results["train_tokens"] > 0
    assert results["eval_loss_start"] == records[0]["eval_loss"] > results["eval_loss"]

    # The adapter reloads with peft and changes the model's output.
    ids = torch.tensor([[1, 520, 3012, 2]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert not torch.allclose(tuned(ids).logits, base_logits, atol=1e-4)


def test_freeze_trains_only_the_chosen_layers(tmp_path, train_config, tiny_model_dir):
    config = {k: v for k, v in train_config.items() if k != "lora_rank"}
    config |= {"finetuning_type": "freeze", "freeze_trainable_layers": 1,
               "freeze_trainable_modules": "mlp"}
    assert train(tmp_path, config) == 0
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(Path(config["output_dir"]) / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.1.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}


def test_full_changes_every_matrix(tmp_path, train_config, tiny_model_dir):
    config = {k: v for k, v in train_config.items() if k != "lora_rank"} | {"finetuning_type": "full"}
    assert train(tmp_path, config) == 0
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(Path(config["output_dir"]) / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before if before[k].ndim == 2)


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path, train_config):
    config = train_config | {"max_steps": 4, "save_steps": 2, "lora_dropout": 0.1}
    assert train(tmp_path, config) == 0
    full_run = Path(config["output_dir"])
    checkpoint = full_run / "checkpoint-2"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (full_run / "checkpoint-4").exists()  # the final model is the output itself

    # An interrupted run: only its first checkpoint and log survived, plus a half-written one.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(checkpoint, interrupted / "checkpoint-2")
    shutil.copytree(checkpoint, interrupted / "checkpoint-3")
    (interrupted / "checkpoint-3" / COMPLETE_MARKER).unlink()
    (interrupted / "trainer_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in log_of(full_run) if r["step"] <= 3))
    resumed = config | {"output_dir": str(interrupted), "resume_from_checkpoint": "auto"}
    assert train(tmp_path, resumed, "resume.yaml") == 0

    assert [r["loss"] for r in log_of(interrupted)] == [r["loss"] for r in log_of(full_run)]
    a = load_file(full_run / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path, train_config, capsys):
    out = Path(train_config["output_dir"])
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert train(tmp_path, train_config) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "resume_from_checkpoint" in err and "overwrite_output_dir" in err
    # overwrite_output_dir never deletes a folder lmtune did not write
    assert train(tmp_path, train_config | {"overwrite_output_dir": True}) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_non_finite_loss_stops_without_saving(tmp_path, train_config, capsys):
    config = {k: v for k, v in train_config.items() if k != "lora_rank"}
    config |= {"finetuning_type": "full", "learning_rate": 1e30, "max_grad_norm": 0.0}
    assert train(tmp_path, config) == 2
    err = capsys.readouterr().err
    assert "step" in err and ("nan" in err.lower() or "inf" in err.lower())
    assert "Traceback" not in err
    assert not (Path(config["output_dir"]) / "model.safetensors").exists()


def test_every_row_over_long_is_a_clear_error(tmp_path, train_config, capsys):
    assert train(tmp_path, train_config | {"cutoff_len": 8}) == 2
    err = capsys.readouterr().err
    assert "cutoff_len=8" in err and "raise cutoff_len" in err


def test_runs_with_different_precision_in_one_process(tmp_path, train_config):
    assert train(tmp_path, train_config | {"bf16": True, "output_dir": str(tmp_path / "a")}) == 0
    assert train(tmp_path, train_config | {"output_dir": str(tmp_path / "b")}) == 0


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path, train_config):
    out = Path(train_config["output_dir"])
    config = train_config | {"max_steps": 7, "save_steps": 2, "save_total_limit": 2}
    assert train(tmp_path, config) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_resume_with_a_changed_meaning_is_refused(tmp_path, train_config, capsys):
    config = train_config | {"max_steps": 4, "save_steps": 2}
    assert train(tmp_path, config) == 0
    changed = config | {"resume_from_checkpoint": "auto", "learning_rate": 5e-4,
                        "per_device_train_batch_size": 4, "logging_steps": 3}
    assert train(tmp_path, changed) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.001 -> 0.0005" in err and "per_device_train_batch_size: 2 -> 4" in err
    assert "logging_steps" not in err  # cadence may change freely


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, train_config, monkeypatch, capsys):
    import lmtune.train.checkpoint as ckpt

    config = train_config | {"max_steps": 6, "save_steps": 2}
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    assert train(tmp_path, config) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint-4" in err and "No space left" in err
    out = Path(config["output_dir"])
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()
    assert not list(out.glob("*checkpoint-4*"))  # no half-written folder left behind
