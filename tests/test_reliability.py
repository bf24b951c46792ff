"""Overwrite never destroys what lmtune did not write; a full disk is survivable; every failure is
one message. Disk-full cases run on a real, small tmpfs (mounting one needs root, as in CI)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from lmtune.cli import main
from lmtune.config import build_config, load_config
from lmtune.errors import ConfigError
from lmtune.durable import WriteError
from lmtune.train.checkpoint import (FINAL_MARKER, RUN_MARKER, complete_checkpoints, prepare_run,
                                     save_final)
from lmtune.train.fingerprint import RESUME_MAY_CHANGE, changed_keys
from lmtune.train.reward_fn import load_reward_function
from tests.conftest import write_yaml


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size in MiB; skipped (with the reason) where mounting is not
    allowed."""
    mounts: list[Path] = []

    def mount(mib: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a disk-full test mounts a small tmpfs, which needs root (.ci/run runs as root)")
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(disk: Path, leave_mib: float) -> None:
    """Take all but `leave_mib` of the disk's free space."""
    free = shutil.disk_usage(disk).free
    with open(disk / f"ballast-{uuid.uuid4().hex[:6]}", "wb") as handle:
        handle.write(b"\0" * max(0, int(free - leave_mib * 2**20)))


# --- overwrite deletes only what lmtune wrote -----------------------------------------------------

def test_overwrite_with_the_base_model_as_output_dir_deletes_nothing(tmp_path, tiny_model_dir,
                                                                     train_config, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    config = train_config | {"model_name_or_path": str(model), "output_dir": str(model),
                             "overwrite_output_dir": True}
    code, err = run(["train", str(write_yaml(tmp_path / "run.yaml", config))], capsys)
    assert code == 2 and "model_name_or_path" in err and "inside output_dir" in err
    assert sorted(p.name for p in model.iterdir()) == before


def test_overwrite_keeps_a_folder_another_tool_wrote(tmp_path, train_config, capsys):
    # What LLaMA-Factory or HF Trainer leave: the same file names lmtune writes, but no RUN_MARKER.
    old = tmp_path / "saves" / "old-run"
    old.mkdir(parents=True)
    for name in ("trainer_log.jsonl", "all_results.json", "adapter_config.json", "run_config.yaml"):
        (old / name).write_text("{}")
    (old / "checkpoint-5").mkdir()
    config = train_config | {"output_dir": str(old), "overwrite_output_dir": True}
    code, err = run(["train", str(write_yaml(tmp_path / "run.yaml", config))], capsys)
    assert code == 2 and RUN_MARKER in err and "deletes nothing" in err
    assert len(list(old.iterdir())) == 5


def test_overwrite_replaces_a_folder_lmtune_wrote(tmp_path, train_config, capsys):
    config = train_config | {"do_train": False}
    assert main(["train", str(write_yaml(tmp_path / "a.yaml", config))]) == 0
    out = Path(config["output_dir"])
    assert (out / RUN_MARKER).is_file()
    (out / "stale.txt").write_text("from the first run")
    again = config | {"overwrite_output_dir": True}
    assert main(["train", str(write_yaml(tmp_path / "b.yaml", again))]) == 0
    assert not (out / "stale.txt").exists() and (out / RUN_MARKER).is_file()


@pytest.mark.parametrize("key", ["dataset", "adapter_name_or_path", "ref_model"])
def test_an_input_inside_output_dir_is_refused_before_loading(tmp_path, train_config, key, capsys):
    out = tmp_path / "out"
    inside = out / "inner"
    inside.mkdir(parents=True)
    if key == "dataset":
        shutil.copy(train_config["dataset"], inside / "tiny.json")
        value = str(inside / "tiny.json")
    else:
        value = str(inside)
    config = train_config | {key: value, "output_dir": str(out), "stage": "dpo"
                             if key == "ref_model" else "sft"}
    code, err = run(["train", str(write_yaml(tmp_path / "run.yaml", config))], capsys)
    assert code == 2 and f"{key}: {value} lies inside output_dir" in err
    assert sorted(p.name for p in out.iterdir()) == ["inner"]


def test_output_dir_that_is_a_file(tmp_path, train_config, capsys):
    (tmp_path / "taken").write_text("x")
    config = train_config | {"output_dir": str(tmp_path / "taken")}
    code, err = run(["train", str(write_yaml(tmp_path / "run.yaml", config))], capsys)
    assert code == 2 and "is a file, not a folder" in err
    assert (tmp_path / "taken").read_text() == "x"


def test_output_dir_under_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["output_dir=~/runs/a", "export_dir=~/merged", "dataset=x"])
    assert cfg.output_dir == str(tmp_path / "runs" / "a")
    assert cfg.export_dir == str(tmp_path / "merged")


# --- resume compares the math and the data --------------------------------------------------------

@pytest.mark.parametrize("key", ["packing", "train_on_prompt", "mask_history", "cutoff_policy",
                                 "mix_strategy", "use_dora", "quantization_bit", "pref_loss",
                                 "pref_beta", "ppo_kl_coef", "skip_bad_records", "template"])
def test_resume_compares_every_key_that_changes_the_math(key):
    assert key not in RESUME_MAY_CHANGE
    assert changed_keys({key: "before", "stage": "sft"}, {key: "after", "stage": "sft"}) == [key]


def test_resume_allows_cadence_and_output_keys():
    saved = {"logging_steps": 1, "save_steps": 5, "eval_steps": 3, "output_dir": "a",
             "temperature": 0.5, "stage": "sft"}
    now = {"logging_steps": 2, "save_steps": 9, "eval_steps": 4, "output_dir": "b",
           "temperature": 0.9, "stage": "sft"}
    assert changed_keys(saved, now) == []
    assert changed_keys(saved | {"stage": "ppo"}, now | {"stage": "ppo"}) == ["temperature"]


def test_resume_refuses_a_changed_key_or_edited_data(tmp_path, train_config):
    config = train_config | {"save_steps": 2, "max_steps": 4, "plot_loss": False}
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    out = Path(config["output_dir"])
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    resume = config | {"resume_from_checkpoint": "auto"}

    with pytest.raises(ConfigError, match="train_on_prompt: False -> True"):
        prepare_run(build_config(resume | {"train_on_prompt": True}))
    prepare_run(build_config(resume | {"logging_steps": 2, "save_steps": 7}))  # cadence may change

    data = Path(config["dataset"])
    records = json.loads(data.read_text())
    records[0]["output"] = "Hello!"
    data.write_text(json.dumps(records))  # same file name, other data
    with pytest.raises(ConfigError, match="contents of the data files changed"):
        prepare_run(build_config(resume))


# --- a full disk ----------------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, train_config, small_disk,
                                                              capsys):
    # Full fine-tuning of the tiny model: a checkpoint is ~45 MB (weights, the tokenizer, AdamW's two
    # moments), so the first fits on 64 MB and the second runs out of space: torch.save or
    # safetensors fails (RuntimeError / SafetensorError, not OSError).
    out = small_disk(64) / "out"
    config = {k: v for k, v in train_config.items() if k != "lora_rank"} | {
        "finetuning_type": "full", "output_dir": str(out), "max_steps": 3, "save_steps": 1,
        "plot_loss": False}
    code, err = run(["train", str(write_yaml(tmp_path / "run.yaml", config))], capsys)
    assert code == 2, err
    assert "could not write checkpoint-2" in err and "checkpoint-1, the newest complete" in err
    assert "free disk space" in err
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert (out / "checkpoint-1" / "optimizer.pt").stat().st_size > 1_000_000


def test_disk_full_during_the_final_save_leaves_an_output_chat_refuses(tmp_path, train_config,
                                                                       tiny_model_dir, small_disk,
                                                                       capsys):
    out = small_disk(40) / "out"
    config = train_config | {"output_dir": str(out), "plot_loss": False}
    run_yaml = write_yaml(tmp_path / "run.yaml", config)
    assert main(["train", str(run_yaml)]) == 0
    assert (out / FINAL_MARKER).is_file()
    before = (out / "adapter_model.safetensors").read_bytes()

    fill(out.parent, leave_mib=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # ~13 MB of weights: no room
    with pytest.raises(WriteError) as info:
        save_final(out, lambda folder: model.save_pretrained(folder, safe_serialization=True))
    assert "could not write the final model" in info.value.message
    assert "no complete final model" in info.value.message
    assert not (out / FINAL_MARKER).exists() and not (out / ".final.staging").exists()
    assert (out / "adapter_model.safetensors").read_bytes() == before  # nothing half-replaced

    code, err = run(["chat", str(run_yaml), "--prompt", "hi"], capsys)
    assert code == 2 and "did not finish" in err and "--base" in err
    code, err = run(["export", str(run_yaml), f"export_dir={tmp_path / 'merged'}"], capsys)
    assert code == 2 and "did not finish" in err


def test_disk_full_in_a_runs_final_save_is_one_message_and_no_finished_output(tmp_path,
                                                                               train_config,
                                                                               small_disk, capsys):
    # The tiny model's full weights (~13 MB) cannot fit on 12 MB: the run's own final save fails.
    out = small_disk(12) / "out"
    config = {k: v for k, v in train_config.items() if k != "lora_rank"} | {
        "finetuning_type": "full", "output_dir": str(out), "max_steps": 1, "plot_loss": False}
    run_yaml = write_yaml(tmp_path / "run.yaml", config)
    code, err = run(["train", str(run_yaml)], capsys)
    assert code == 2 and "could not write the final model" in err and "Traceback" not in err
    assert not (out / FINAL_MARKER).exists() and not (out / "model.safetensors").exists()
    code, err = run(["chat", str(run_yaml), "--prompt", "hi"], capsys)
    assert code == 2 and "did not finish" in err


def test_disk_full_during_export_leaves_no_folder(tmp_path, train_config, small_disk, capsys):
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", train_config))]) == 0
    disk = small_disk(8)  # the merged tiny model needs ~17 MB with its tokenizer
    config = train_config | {"export_dir": str(disk / "merged")}
    code, err = run(["export", str(write_yaml(tmp_path / "export.yaml", config))], capsys)
    assert code == 2 and "could not write the exported model" in err and "Nothing was exported" in err
    assert list(disk.iterdir()) == []


def test_unwritable_data_cache_warns_and_trains(tmp_path, train_config, monkeypatch, capsys):
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path / "not-a-folder"))
    config = train_config | {"max_steps": 1, "plot_loss": False}
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    out = capsys.readouterr().out
    assert "warning: could not write the encoded-data cache" in out and "LMTUNE_HOME" in out
    assert (Path(config["output_dir"]) / FINAL_MARKER).is_file()


# --- one message instead of a traceback -----------------------------------------------------------

def test_unknown_model_type_in_plan(tmp_path, tiny_model_dir, train_config, capsys):
    model = tmp_path / "odd-model"
    shutil.copytree(tiny_model_dir, model)
    config_json = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config_json | {"model_type": "no_such_arch"}))
    config = train_config | {"model_name_or_path": str(model)}
    code, err = run(["plan", str(write_yaml(tmp_path / "run.yaml", config))], capsys)
    assert code == 2 and "no_such_arch" in err and str(model) in err


def test_truncated_weights_in_train(tmp_path, tiny_model_dir, train_config, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    config = train_config | {"model_name_or_path": str(model)}
    code, err = run(["train", str(write_yaml(tmp_path / "run.yaml", config))], capsys)
    assert code == 2 and "cannot be read" in err and str(model) in err


def test_plan_dump_into_a_missing_folder(tmp_path, train_config, capsys):
    target = tmp_path / "no" / "such" / "rows.jsonl"
    code, err = run(["plan", str(write_yaml(tmp_path / "run.yaml", train_config)),
                     "--dump-encoded", str(target)], capsys)
    assert code == 2 and str(target) in err and "does not exist" in err


def test_plan_measure_steps_must_be_positive(tmp_path, train_config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", str(write_yaml(tmp_path / "run.yaml", train_config)), "--measure",
              "--measure-steps", "-1"])
    assert info.value.code == 2
    assert "--measure-steps" in capsys.readouterr().err
    assert not Path(train_config["output_dir"]).exists()


def test_chat_prompts_file_not_utf8(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_bytes(b'[{"prompt": "caf\xe9"}]')
    code, err = run(["chat", f"model_name_or_path={tiny_model_dir}", "--prompts", str(prompts)],
                    capsys)
    assert code == 2 and str(prompts) in err and "not UTF-8" in err


# --- reward_model: module:function ----------------------------------------------------------------

def test_reward_module_with_a_syntax_error(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def score(prompts, replies:\n    return []\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_reward_function("broken_rewards:score")
    assert "broken_rewards.py, line 1" in info.value.message
    assert "" not in sys.path


def test_ppo_with_a_broken_reward_module_is_one_message(tmp_path, ppo_config, monkeypatch,
                                                        capsys):
    (tmp_path / "broken_rewards.py").write_text("def score(prompts, replies:\n    return []\n")
    monkeypatch.chdir(tmp_path)
    config = ppo_config | {"reward_model": "broken_rewards:score"}
    code, err = run(["train", str(write_yaml(tmp_path / "ppo.yaml", config))], capsys)
    assert code == 2 and "broken_rewards.py, line 1" in err and "Traceback" not in err


def test_reward_function_is_imported_without_leaving_the_working_folder_on_sys_path(tmp_path,
                                                                                   monkeypatch):
    (tmp_path / "good_rewards.py").write_text("def score(prompts, replies):\n"
                                              "    return [float(len(r)) for r in replies]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    score = load_reward_function("good_rewards:score")
    assert score(["a"], ["abc"]) == [3.0]
    assert "" not in sys.path
    with pytest.raises(ConfigError, match="has no function nope"):
        load_reward_function("good_rewards:nope")
    (tmp_path / "raising_rewards.py").write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ConfigError, match="RuntimeError: no GPU here"):
        load_reward_function("raising_rewards:score")


# --- fuzzing past the config: the CLI loads the model, reads the data and writes the folder -------

SITUATIONS = ["missing", "empty", "foreign", "lmtune", "file", "under_a_file", "model_inside"]


@settings(max_examples=14, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(situation=st.sampled_from(SITUATIONS), overwrite=st.booleans(), resume=st.booleans(),
       nested=st.booleans())
def test_train_cli_with_any_output_folder(tmp_path_factory, tiny_model_dir, alpaca_file_module,
                                          situation, overwrite, resume, nested):
    root = tmp_path_factory.mktemp("fuzz")
    out = root / "a" / "out" if nested or situation == "under_a_file" else root / "out"
    precious = []
    if situation in ("empty", "foreign", "lmtune", "model_inside"):
        out.mkdir(parents=True)
    if situation == "foreign":
        precious.append(out / "adapter_model.safetensors")
        precious[-1].write_text("someone else's")
    if situation == "lmtune":
        (out / RUN_MARKER).write_text("{}")
    if situation == "file":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("a file")
        precious.append(out)
    if situation == "under_a_file":
        out.parent.parent.mkdir(parents=True, exist_ok=True)
        out.parent.write_text("a file")
        precious.append(out.parent)
    model = tiny_model_dir
    if situation == "model_inside":
        model = str(out / "model")
        shutil.copytree(tiny_model_dir, model)
        precious.append(out / "model" / "model.safetensors")
    config = {"model_name_or_path": model, "dataset": str(alpaca_file_module), "output_dir": str(out),
              "do_train": False, "overwrite_output_dir": overwrite and not resume,
              "resume_from_checkpoint": "auto" if resume else None}
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", str(write_yaml(root / "run.yaml", config))])
    err = stderr.getvalue()
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and "fix: " in err
    else:
        assert (out / RUN_MARKER).is_file() and (out / "data_report.json").is_file()
    for path in precious:
        assert path.exists(), (situation, err)


@pytest.fixture(scope="module")
def alpaca_file_module(tmp_path_factory):
    from tests.conftest import ALPACA, write_json

    return write_json(tmp_path_factory.mktemp("data") / "tiny.json", ALPACA)
