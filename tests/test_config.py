"""RunConfig: YAML loading, key/type checks, impossible combinations, overrides and derived values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_yaml
from lmtune.cli import main
from lmtune.config import (ACCEPTED_NOT_APPLIED, RunConfig, build_config, check_training_inputs,
                           load_config, parse_overrides)
from lmtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# compare*.yaml are `lmtune compare` specs, parsed by tests/test_compare.py; accelerate/*.yaml are
# `accelerate launch` configs, parsed by tests/test_distributed.py.
EXAMPLES = sorted(p for p in (REPO / "examples").glob("**/*.yaml")
                  if not p.name.startswith("compare") and p.parent.name != "accelerate")


# --- examples -----------------------------------------------------------------------------------

def test_examples_exist():
    assert EXAMPLES, "examples/ holds no YAML files"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # The examples are meant to be trained as they are.
    check_training_inputs(cfg)
    assert cfg.not_applied == {} or set(cfg.not_applied) <= set(ACCEPTED_NOT_APPLIED)


def test_quickstart_values_are_typed():
    cfg = load_config(REPO / "examples" / "quickstart.yaml")
    # `5.0e-4` in YAML is a float; the comment after `dataset:` is not part of the value.
    assert cfg.learning_rate == pytest.approx(5e-4)
    assert cfg.dataset_names == ["identity", "general_replay"]
    assert cfg.data_vars == {"name": "Orrin", "author": "Tallis Labs"}
    assert cfg.mixed_precision == "bf16"
    assert cfg.effective_lora_alpha == 16


# --- unknown keys -------------------------------------------------------------------------------

@pytest.mark.parametrize("typo,meant", [
    ("learning_rat", "learning_rate"),
    ("lora_rnak", "lora_rank"),
    ("num_train_epoch", "num_train_epochs"),
    ("per_device_train_batchsize", "per_device_train_batch_size"),
])
def test_unknown_key_names_key_and_suggests_closest(tmp_path, typo, meant):
    path = write_yaml(tmp_path / "c.yaml", {"dataset": "identity", typo: 1})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert f"'{typo}'" in err.message
    assert str(path) in err.message
    assert err.fix == f"did you mean '{meant}'?"
    assert f"'{meant}'" in str(err)


def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(ConfigError) as info:
        build_config({"zzzqqq_xyz": 3})
    assert "'zzzqqq_xyz'" in info.value.message
    assert "did you mean" not in str(info.value)
    assert "--help" in info.value.fix


def test_unknown_key_from_override_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora_rnak=4"])
    assert "'lora_rnak'" in info.value.message
    assert "command line" in info.value.message
    assert "'lora_rank'" in info.value.fix


def test_every_unknown_key_is_reported_at_once_each_with_its_guess(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"dataset": "identity", "learning_rat": 1e-4,
                                            "zzzqqq_xyz": 3, "lora_rnak": 8, "ld_alpha": 0.5})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = info.value.message.splitlines()
    assert lines[0] == f"{path}: 4 keys lmtune cannot use:"
    assert lines[1:] == [
        "  - unknown key 'learning_rat': did you mean 'learning_rate'?",
        "  - unknown key 'lora_rnak': did you mean 'lora_rank'?",
        "  - unknown key 'zzzqqq_xyz'",
        "  - ld_alpha: 0.5 is a LLaMA-Factory feature lmtune does not have: LD-DPO's length "
        "weighting is not implemented; remove it.",
    ]
    assert "--help" in info.value.fix


def test_cli_reports_unknown_keys_of_file_and_overrides_together(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"dataset": "identity", "output_dir": str(tmp_path / "o"),
                                            "learning_rat": 1e-4})
    assert main(["train", str(path), "num_train_epoch=2"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'learning_rate'?" in err
    assert "did you mean 'num_train_epochs'?" in err
    assert "Traceback" not in err


# --- wrong types --------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("learning_rate", "abc"),
    ("lora_rank", 1.5),
    ("bf16", "maybe"),
    ("finetuning_type", "qlora"),
    ("cutoff_len", 1),
    ("lr_scheduler_type", "exponential"),
    ("report_to", "comet_ml"),
    ("data_vars", ["name", "Orrin"]),
])
def test_wrong_type_names_the_key(tmp_path, key, value):
    path = write_yaml(tmp_path / "c.yaml", {key: value})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.message.startswith(f"{path}: {key}")
    assert repr(value) in err.message
    assert f"'{key}'" in err.fix


def test_literal_error_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        build_config({"finetuning_type": "qlora"})
    msg = info.value.message
    assert "finetuning_type" in msg and "'qlora'" in msg
    for choice in ("full", "freeze", "lora"):
        assert f"'{choice}'" in msg


def test_scalar_strings_are_coerced():
    # PyYAML reads `1e-4` (no dot) as a string; it must still become a float.
    cfg = build_config({"learning_rate": "1e-4", "lora_rank": "16", "bf16": "true"})
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.lora_rank == 16 and isinstance(cfg.lora_rank, int)
    assert cfg.bf16 is True


# --- accepted but not applied -------------------------------------------------------------------

def test_accepted_not_applied_keys_load_and_are_reported(tmp_path):
    extra = {"dataloader_num_workers": 4, "use_fast_tokenizer": True, "save_only_model": False}
    path = write_yaml(tmp_path / "c.yaml", {"dataset": "identity", "output_dir": "out", **extra})
    cfg = load_config(path)
    assert cfg.not_applied == extra
    assert not hasattr(cfg, "use_fast_tokenizer")
    # Not part of the saved, resolved config.
    assert "not_applied" not in cfg.to_yaml_dict()
    assert "use_fast_tokenizer" not in cfg.to_yaml_dict()


def test_not_applied_is_empty_by_default():
    assert build_config({}).not_applied == {}


# --- impossible combinations --------------------------------------------------------------------

@pytest.mark.parametrize("values,words", [
    ({"bf16": True, "fp16": True}, ["bf16", "fp16"]),
    ({"finetuning_type": "full", "lora_rank": 16}, ["lora_rank", "full"]),
    ({"finetuning_type": "freeze", "lora_target": "q_proj"}, ["lora_target", "freeze"]),
    ({"finetuning_type": "lora", "freeze_trainable_layers": 4}, ["freeze_trainable_layers", "lora"]),
    ({"freeze_trainable_modules": "mlp"}, ["freeze_trainable_modules"]),
    ({"warmup_ratio": 0.1, "warmup_steps": 10}, ["warmup_ratio", "warmup_steps"]),
    ({"warmup_steps": 2.5}, ["warmup_steps: 2.5"]),
    ({"val_size": 2.5}, ["val_size: 2.5"]),
    ({"eval_strategy": "steps", "val_size": 0}, ["eval_strategy: steps", "val_size"]),
    ({"eval_strategy": "epoch"}, ["eval_strategy: epoch", "val_size"]),
    ({"resume_from_checkpoint": "auto", "overwrite_output_dir": True},
     ["resume_from_checkpoint", "overwrite_output_dir"]),
])
def test_impossible_combinations_are_refused_with_a_fix(values, words):
    with pytest.raises(ConfigError) as info:
        build_config(values)
    err = info.value
    for word in words:
        assert word in err.message
    assert err.fix and err.fix.strip()
    assert "fix: " + err.fix in str(err)


def test_method_key_fix_names_the_key_and_the_method():
    with pytest.raises(ConfigError) as info:
        build_config({"finetuning_type": "full", "lora_rank": 16, "lora_alpha": 32})
    assert info.value.message.startswith("lora_alpha, lora_rank belong to finetuning_type: lora")
    assert info.value.fix == "remove lora_alpha, lora_rank or set finetuning_type: lora."


@pytest.mark.parametrize("values", [
    {"finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 8},
    {"finetuning_type": "freeze", "freeze_trainable_layers": -3},
    {"finetuning_type": "full"},
    {"eval_strategy": "steps", "val_size": 0.1},
    {"eval_strategy": "epoch", "val_size": 20},
    {"warmup_steps": 0.2},
    {"warmup_steps": 7.0},
    {"bf16": True},
    {"resume_from_checkpoint": "auto"},
])
def test_possible_combinations_are_accepted(values):
    cfg = build_config(values)
    for key, value in values.items():
        assert getattr(cfg, key) == value


def test_check_training_inputs_needs_dataset_and_output_dir():
    with pytest.raises(ConfigError) as info:
        check_training_inputs(build_config({"output_dir": "out"}))
    assert "dataset" in info.value.message and info.value.fix
    with pytest.raises(ConfigError) as info:
        check_training_inputs(build_config({"dataset": " , "}))
    assert "dataset" in info.value.message
    with pytest.raises(ConfigError) as info:
        check_training_inputs(build_config({"dataset": "identity"}))
    assert "output_dir" in info.value.message and "output_dir" in info.value.fix
    check_training_inputs(build_config({"dataset": "identity", "output_dir": "out"}))


# --- overrides ----------------------------------------------------------------------------------

def test_overrides_are_typed_and_merge_data_vars(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {
        "learning_rate": 5e-5, "lora_rank": 8, "output_dir": "out",
        "data_vars": {"name": "Orrin", "author": "Tallis Labs"}})
    cfg = load_config(path, ["learning_rate=1e-4", "lora_rank=16", "data_vars.name=Zed"])
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 1e-4
    assert isinstance(cfg.lora_rank, int) and cfg.lora_rank == 16
    assert cfg.data_vars == {"name": "Zed", "author": "Tallis Labs"}
    assert cfg.output_dir == "out"  # untouched YAML keys stay
    assert cfg.effective_lora_alpha == 32


def test_overrides_without_yaml_and_data_vars_without_yaml_section(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"lora_rank": 4})
    cfg = load_config(path, ["data_vars.name=Zed", "data_vars.author=Ann Lee", "bf16=true"])
    assert cfg.data_vars == {"name": "Zed", "author": "Ann Lee"}
    assert cfg.bf16 is True
    cfg = load_config(None, ["seed=7", "dataset=a,b"])
    assert cfg.seed == 7 and cfg.dataset_names == ["a", "b"]


def test_override_must_be_key_value():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["learning_rate"])
    assert "'learning_rate'" in info.value.message and "key=value" in info.value.message
    with pytest.raises(ConfigError):
        parse_overrides(["=3"])


def test_override_type_errors_name_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora_rank=many"])
    assert "lora_rank" in info.value.message and "'many'" in info.value.message


def test_data_vars_override_keeps_text_verbatim():
    cfg = load_config(None, ["data_vars.code=007", "data_vars.version=1.10", "data_vars.ok=yes"])
    assert cfg.data_vars == {"code": "007", "version": "1.10", "ok": "yes"}


# --- malformed files ----------------------------------------------------------------------------

def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora_rank: 8\nlearning_rate: 1.0e-4\ndataset: [identity\ncutoff_len: 512\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = info.value.message
    assert str(path) in msg
    assert "not valid YAML" in msg
    assert "(line 4, column" in msg
    assert info.value.fix


def test_bad_indentation_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora_rank: 8\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "(line 2, column" in info.value.message


def test_top_level_list_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lora_rank: 8\n- learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message and "mapping" in info.value.message


def test_top_level_scalar_is_refused(tmp_path):
    path = tmp_path / "scalar.yaml"
    path.write_text("just some words\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not found" in info.value.message and str(path) in info.value.message


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    cfg = load_config(path)
    assert cfg.model_name_or_path == "default"
    assert cfg.finetuning_type == "lora" and cfg.lora_rank == 8 and cfg.cutoff_len == 2048


# --- derived values -----------------------------------------------------------------------------

def test_effective_lora_alpha():
    assert build_config({}).effective_lora_alpha == 16
    assert build_config({"lora_rank": 4}).effective_lora_alpha == 8
    assert build_config({"lora_rank": 4, "lora_alpha": 5}).effective_lora_alpha == 5


@pytest.mark.parametrize("values,total,expected", [
    ({"warmup_ratio": 0.1}, 100, 10),
    ({"warmup_steps": 0.2}, 100, 20),
    ({"warmup_steps": 7}, 100, 7),
    ({"warmup_steps": 7}, 3, 7),
    ({}, 100, 0),
    ({"warmup_ratio": 0.25}, 10, 2),   # round(2.5) -> 2 (banker's rounding)
    ({"warmup_ratio": 0.05}, 30, 2),   # round(1.5) -> 2
])
def test_warmup_for(values, total, expected):
    assert build_config(values).warmup_for(total) == expected


def test_other_derived_values():
    cfg = build_config({"logging_steps": 5, "adapter_name_or_path": "a, b,,c",
                        "dataset": "x ,y"})
    assert cfg.effective_eval_steps == 5
    assert cfg.adapter_paths == ["a", "b", "c"]
    assert cfg.dataset_names == ["x", "y"]
    assert build_config({"eval_steps": 3}).effective_eval_steps == 3
    assert build_config({"fp16": True}).mixed_precision == "fp16"
    assert build_config({}).mixed_precision == "no"
    assert build_config({"report_to": "none,none"}).report_to == ["none", "none"]


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_train_unknown_key_exits_2_without_traceback(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"dataset": "identity", "output_dir": str(tmp_path / "o"),
                                            "learning_rat": 1e-4})
    code = main(["train", str(path)])
    captured = capsys.readouterr()
    assert code == 2
    assert "error:" in captured.err
    assert "'learning_rat'" in captured.err
    assert "did you mean 'learning_rate'?" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "o").exists()


def test_cli_train_missing_dataset_exits_2(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "o")})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "needs a dataset" in err and "Traceback" not in err


def test_cli_train_bad_override_exits_2(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", {"dataset": "identity", "output_dir": str(tmp_path / "o")})
    assert main(["train", str(path), "bf16=true", "fp16=true"]) == 2
    err = capsys.readouterr().err
    assert "bf16 and fp16 are both true" in err and "fix:" in err and "Traceback" not in err
