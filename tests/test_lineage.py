"""Which weights an adapter belongs on: the record saved with it, the export's record, and the one
rule chat and export (and every loader) apply. `key=null` on the command line means none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from lmtune.cli import main
from lmtune.config import build_config, load_config
from lmtune.errors import ModelError
from lmtune.infer.chat import ChatSession
from lmtune.models.lineage import (BASE_RECORD, EXPORT_RECORD, adapter_fingerprint, check_adapter,
                                   weights_fingerprint, weights_of)
from lmtune.models.methods import load_adapters
from tests.conftest import write_json, write_yaml

IDS = torch.tensor([[1, 9690, 198, 33, 42, 2, 198, 1, 4093]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model's architecture and tokenizer with other random weights."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    folder = tmp_path_factory.mktemp("other-model")
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(tiny_model_dir) / name).is_file():
            shutil.copy(Path(tiny_model_dir) / name, folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> dict:
    """A LoRA run on the tiny model (with a checkpoint) and its merged export."""
    root = tmp_path_factory.mktemp("lineage")
    data = write_json(root / "hi.json", [{"instruction": "Greet me.", "input": "",
                                          "output": "Hello from the tiny model."}] * 4)
    config = {"model_name_or_path": tiny_model_dir, "dataset": str(data),
              "output_dir": str(root / "out"), "lora_rank": 4, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "max_steps": 4, "save_steps": 2, "seed": 0,
              "max_new_tokens": 4, "plot_loss": False}
    path = write_yaml(root / "run.yaml", config)
    assert main(["train", str(path)]) == 0
    assert main(["export", str(path), f"export_dir={root / 'merged'}"]) == 0
    return {"config": config, "yaml": str(path), "root": root, "out": str(root / "out"),
            "merged": str(root / "merged")}


def test_adapters_and_checkpoints_record_their_base(run, tiny_model_dir):
    for folder in (Path(run["out"]), Path(run["out"]) / "checkpoint-2"):
        record = json.loads((folder / BASE_RECORD).read_text())
        assert record == {"base_model_name_or_path": tiny_model_dir,
                          "base_fingerprint": weights_fingerprint(tiny_model_dir),
                          "merged_adapters": []}
    export = json.loads((Path(run["merged"]) / EXPORT_RECORD).read_text())
    assert export["lineage"] == {
        "base_model_name_or_path": tiny_model_dir,
        "base_fingerprint": weights_fingerprint(tiny_model_dir),
        "merged_adapters": [{"path": run["out"], "fingerprint": adapter_fingerprint(run["out"])}]}


def test_fingerprint_follows_the_weights_not_the_folder_or_dtype(run, tiny_model_dir,
                                                                other_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).save_pretrained(
        tmp_path / "fp32-of-bf16", max_shard_size="100KB")  # sharded, too
    assert len(list((tmp_path / "fp32-of-bf16").glob("*.safetensors"))) > 1
    assert weights_fingerprint(str(tmp_path / "bf16")) == weights_fingerprint(str(tmp_path / "fp32-of-bf16"))
    shutil.copytree(tiny_model_dir, tmp_path / "copy")
    prints = {weights_fingerprint(p) for p in (tiny_model_dir, str(tmp_path / "copy"))}
    assert len(prints) == 1 and None not in prints
    others = {weights_fingerprint(p) for p in (other_model_dir, run["merged"], str(tmp_path / "bf16"))}
    assert len(others) == 3 and not prints & others
    assert weights_fingerprint(str(tmp_path / "nowhere")) is None


def test_chat_with_the_merged_export_and_adapter_null(run, capsys):
    # The issue: chat on the export through the training YAML, the adapter nulled on the command line.
    assert main(["chat", run["yaml"], f"model_name_or_path={run['merged']}", "adapter_name_or_path=null",
                 "--prompt", "Greet me."]) == 0
    out = capsys.readouterr().out
    assert f"model: {run['merged']}\n" in out and "adapter" not in out
    # Without the null, output_dir's adapter would go on the export a second time: refused by name.
    assert main(["chat", run["yaml"], f"model_name_or_path={run['merged']}", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"adapter {run['out']} is already merged into" in err and "adapter_name_or_path=null" in err


def test_adapter_null_means_the_base_and_yaml_null_does_not(run, tiny_model_dir):
    nulled = load_config(run["yaml"], ["adapter_name_or_path=null"])
    assert weights_of(nulled) == (tiny_model_dir, [])
    session = ChatSession.from_config(nulled)
    assert not isinstance(session.model, PeftModel)
    torch.testing.assert_close(logits(session.model),
                               logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    # A YAML's null is "not given" (saved run configs list every key): the trained adapter.
    yaml_null = write_yaml(Path(run["root"]) / "null.yaml", run["config"] | {"adapter_name_or_path": None})
    assert weights_of(load_config(yaml_null)) == (tiny_model_dir, [run["out"]])


def test_an_adapter_on_other_weights_is_refused_by_chat_and_export(run, other_model_dir, tiny_model_dir,
                                                                   capsys, tmp_path):
    fingerprint = weights_fingerprint(tiny_model_dir)
    for command in (["chat", run["yaml"], f"model_name_or_path={other_model_dir}", "--prompt", "hi"],
                    ["export", run["yaml"], f"model_name_or_path={other_model_dir}",
                     f"export_dir={tmp_path / 'x'}"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"adapter {run['out']} was trained on {tiny_model_dir} (weights fingerprint " \
               f"{fingerprint})" in err and f"not on {other_model_dir}" in err
        assert f"model_name_or_path={tiny_model_dir}" in err
    assert not (tmp_path / "x").exists()


def test_export_refuses_to_merge_an_adapter_into_its_own_export(run, capsys, tmp_path):
    assert main(["export", run["yaml"], f"model_name_or_path={run['merged']}",
                 f"export_dir={tmp_path / 'twice'}"]) == 2
    assert f"adapter {run['out']} is already merged into" in capsys.readouterr().err
    assert main(["export", run["yaml"], "adapter_name_or_path=null",
                 f"export_dir={tmp_path / 'none'}"]) == 2
    assert "adapter_name_or_path is null" in capsys.readouterr().err


def test_a_copy_without_the_record_is_still_refused_on_its_export(run, tmp_path):
    copy = tmp_path / "copied-adapter"
    shutil.copytree(run["out"], copy, ignore=shutil.ignore_patterns("checkpoint-*", BASE_RECORD))
    merged = AutoModelForCausalLM.from_pretrained(run["merged"])
    with pytest.raises(ModelError, match="is already merged into"):
        load_adapters(merged, [str(copy)], trainable_last=False)
    with pytest.raises(ModelError, match="is already merged into"):  # twice in one list
        load_adapters(AutoModelForCausalLM.from_pretrained(run["config"]["model_name_or_path"]),
                      [run["out"], str(copy)], trainable_last=False)


def test_an_adapter_trained_on_the_export_goes_on_the_export_or_on_base_plus_first(run, tiny_model_dir,
                                                                                  tmp_path):
    second = run["config"] | {"model_name_or_path": run["merged"], "output_dir": str(tmp_path / "second"),
                              "save_steps": 100, "max_steps": 2}
    assert main(["train", str(write_yaml(tmp_path / "second.yaml", second))]) == 0
    on_export = ChatSession.from_config(build_config(second)).model
    stacked = load_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            [run["out"], second["output_dir"]], trainable_last=False)
    torch.testing.assert_close(logits(stacked), logits(on_export), atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelError) as info:  # the first adapter left out
        load_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [second["output_dir"]],
                      trainable_last=False)
    assert f"merged adapter {run['out']}" in info.value.message
    assert f"adapter_name_or_path={run['out']},{second['output_dir']}" in info.value.fix


def test_a_plain_peft_adapter_is_checked_by_the_base_it_names(tiny_model_dir, other_model_dir, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "peft")
    adapter = str(tmp_path / "peft")
    assert not (tmp_path / "peft" / BASE_RECORD).exists()
    shutil.copytree(tiny_model_dir, tmp_path / "same-weights")
    check_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "same-weights"), adapter)
    with pytest.raises(ModelError) as info:
        check_adapter(AutoModelForCausalLM.from_pretrained(other_model_dir), adapter)
    assert f"names {tiny_model_dir} as its base" in info.value.message
    # A base it names that is not on this machine cannot be compared: the adapter loads.
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/elses-model"
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    check_adapter(AutoModelForCausalLM.from_pretrained(other_model_dir), adapter)


def test_serve_and_predict_apply_the_same_rule(run, tiny_model_dir):
    from lmtune.evaluate.predict import _load
    from lmtune.serve.app import build_server, served_adapters

    nulled = load_config(run["yaml"], ["adapter_name_or_path=null"])
    assert served_adapters(nulled, []) == (tiny_model_dir, [], [])
    assert served_adapters(load_config(run["yaml"]), [])[2] == [("out", run["out"])]
    model, _, _, what = _load(nulled)
    assert what == "base" and not isinstance(model, PeftModel)
    on_export = load_config(run["yaml"], [f"model_name_or_path={run['merged']}"])
    for load in (lambda: build_server(on_export, []), lambda: _load(on_export)):
        with pytest.raises(ModelError, match=f"adapter {run['out']} is already merged into"):
            load()


def test_eval_applies_the_same_rule(run, other_model_dir, capsys):
    # `lmtune eval --models BASE ADAPTER`: the adapter loads onto the base through the same check.
    data = Path(__file__).resolve().parent.parent / "data"
    config = {"model_name_or_path": other_model_dir, "task": "mmlu_sample_test", "task_dir": data,
              "n_shot": 0}
    command = ["eval", "--models", other_model_dir, run["out"]]
    assert main([command[0], *[f"{k}={v}" for k, v in config.items()], *command[1:]]) == 2
    err = capsys.readouterr().err
    assert f"adapter {run['out']} was trained on" in err and f"not on {other_model_dir}" in err
