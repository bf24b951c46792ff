"""Safe by default: no pickles, no code from checkpoints, no deleting outside the run's folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lmtune.cli import main
from lmtune.errors import ModelError, TrainingError
from lmtune.models.load import load_model
from lmtune.models.methods import load_adapters
from lmtune.train.checkpoint import COMPLETE_MARKER, load_training_state, rotate_checkpoints
from tests.conftest import write_yaml

SRC = Path(__file__).resolve().parent.parent / "src" / "lmtune"


def test_every_torch_load_is_weights_only():
    calls = [(path.name, line) for path in SRC.rglob("*.py")
             for line in path.read_text().splitlines() if re.search(r"\btorch\.load\(", line)]
    assert calls, "the check must see the checkpoint loader"
    assert all("weights_only=True" in line for _, line in calls), calls


def test_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path))
    assert "safetensors only" in info.value.message

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    torch.save({}, adapter / "adapter_model.bin")
    with pytest.raises(ModelError) as info:
        load_adapters(model, [str(adapter)], trainable_last=False)
    assert "adapter_model.safetensors" in info.value.message


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    torch.save({"state": Payload()}, tmp_path / "optimizer.pt")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(TrainingError) as info:
        load_training_state(tmp_path, optimizer, scheduler=None)
    assert "optimizer.pt" in info.value.message


def test_rotation_never_follows_a_link_out_of_output_dir(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "precious"
    for folder in (out / "checkpoint-2", out / "checkpoint-3", elsewhere):
        folder.mkdir(parents=True)
        (folder / COMPLETE_MARKER).write_text("{}")
    (out / "checkpoint-1").symlink_to(elsewhere, target_is_directory=True)
    deleted = rotate_checkpoints(out, keep=1)
    assert [p.name for p in deleted] == ["checkpoint-2"]
    assert (elsewhere / COMPLETE_MARKER).is_file() and (out / "checkpoint-3").is_dir()


def test_overwrite_never_deletes_the_working_folder(tmp_path, train_config, monkeypatch, capsys):
    (tmp_path / "trainer_log.jsonl").write_text("")
    (tmp_path / "mine.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    config = train_config | {"output_dir": ".", "overwrite_output_dir": True}
    assert main(["train", str(write_yaml(tmp_path / "cfg" / "run.yaml", config))]) == 2
    assert "working folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_export_refuses_non_finite_weights(tmp_path, tiny_model_dir, capsys):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()},
              adapter / "adapter_model.safetensors")
    config = {"model_name_or_path": tiny_model_dir, "adapter_name_or_path": str(adapter),
              "export_dir": str(tmp_path / "merged")}
    assert main(["export", str(write_yaml(tmp_path / "export.yaml", config))]) == 2
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "merged" / "model.safetensors").exists()
