"""Stage ppo on the tiny model: rollouts, rewards from a function or a trained reward model, the
reference held fixed, logs, checkpoints and exact resume."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmtune.data.encode import IGNORE_INDEX
from lmtune.models.scalar_head import ScalarHeadModel
from lmtune.train.checkpoint import complete_checkpoints
from lmtune.train.logs import read_log
from lmtune.train.ppo import prompt_of, reference_token_logps, rollout_batch, token_logps
from lmtune.data.encode import EncodedRow
from tests.conftest import (PAIRS, start_train, train, wait_for_log_lines, write_json,
                            write_yaml)


def test_ppo_raises_the_held_out_reward_and_reports_what_it_paid(tmp_path, ppo_config, tiny_model_dir):
    results = train(tmp_path, ppo_config)
    out = Path(ppo_config["output_dir"])
    assert results["eval_reward"] > results["eval_reward_start"] + 0.3
    records = read_log(out / "trainer_log.jsonl")
    assert records[0]["step"] == 0 and "eval_reward" in records[0]  # the start, before any update
    steps = [r for r in records if r["step"] > 0]
    assert len(steps) == 15
    for key in ("reward", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss", "policy_loss",
                "response_length", "lr"):
        assert key in steps[0], key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # reference = the starting policy
    assert any(r["kl"] != 0 for r in steps[1:]) and any(r["clip_fraction"] > 0 for r in steps)
    for name in ("adapter_model.safetensors", "value_head.safetensors", "training_loss.png",
                 "training_reward.png", "all_results.json"):
        assert (out / name).is_file(), name
    # The policy is a standard PEFT adapter on the base.
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


@pytest.mark.parametrize("method", ["lora", "full", "ref_model"])
def test_ppo_resumes_exactly(tmp_path, ppo_config, tiny_model_dir, method):
    """The reference stays the START across a resume: for full fine-tuning a frozen copy made before
    the checkpoint's weights load; a loaded ref_model draws no random numbers, so sampling after a
    resume continues exactly."""
    config = ppo_config | {"max_steps": 4, "save_steps": 2}
    if method == "full":
        config = {k: v for k, v in config.items() if k != "lora_rank"} | {
            "finetuning_type": "full", "learning_rate": 1e-4}
    if method == "ref_model":
        config["ref_model"] = tiny_model_dir
    train(tmp_path, config)
    out = Path(config["output_dir"])
    resumed = config | {"output_dir": str(tmp_path / "resumed"), "resume_from_checkpoint": "auto"}
    shutil.copytree(out / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train(tmp_path, resumed)
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    for name in (weights, "value_head.safetensors"):
        a, b = load_file(out / name), load_file(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    first = read_log(out / "trainer_log.jsonl")
    assert read_log(tmp_path / "resumed" / "trainer_log.jsonl")[-1]["reward"] == first[-1]["reward"]


def test_ppo_against_a_trained_reward_model(tmp_path, ppo_config, tiny_model_dir):
    write_json(tmp_path / "data" / "pairs.json", PAIRS)
    rm_dir = tmp_path / "rm"
    train(tmp_path, {"model_name_or_path": tiny_model_dir, "stage": "rm",
                     "dataset": str(tmp_path / "data" / "pairs.json"), "output_dir": str(rm_dir),
                     "finetuning_type": "lora", "lora_rank": 4, "max_steps": 3, "seed": 0})
    results = train(tmp_path, ppo_config | {"reward_model": str(rm_dir), "max_steps": 2,
                                            "ppo_score_norm": True, "ppo_whiten_rewards": True})
    assert results["global_step"] == 2 and "eval_reward" in results


def test_reference_is_the_base_with_the_adapter_off(tiny_model_dir, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = ScalarHeadModel(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)  # a policy that has moved away from the base
    row = EncodedRow([1, 520, 3012, 2, 17, 99], [IGNORE_INDEX] * 3 + [2, 17, 99])
    prompt = prompt_of(row)
    assert prompt == [1, 520, 3012]
    batch = rollout_batch([prompt], [[2, 17, 99]], tokenizer.pad_token_id)
    ref = reference_token_logps(policy, policy, batch)
    plain = ScalarHeadModel(base)
    with torch.no_grad():
        expected = token_logps(plain.eval(), batch, with_values=False)[0]
        moved = token_logps(policy, batch, with_values=False)[0]
    assert torch.allclose(ref, expected, atol=1e-5)
    assert (moved - expected).abs().max() > 1e-3
    assert ref[0, :2].abs().sum() == 0 and (ref[0, 2:] < 0).all()  # only reply positions count


@pytest.mark.parametrize("how", ["full", "ref_model"])
def test_ppo_reference_without_an_adapter_to_switch_off(tmp_path, ppo_config, tiny_model_dir, how):
    """full: a frozen copy of the starting policy; ref_model: that model, loaded."""
    config = ppo_config | {"max_steps": 3}
    if how == "full":
        config = {k: v for k, v in config.items() if k != "lora_rank"} | {
            "finetuning_type": "full", "learning_rate": 1e-4}
    else:
        config["ref_model"] = tiny_model_dir
    train(tmp_path, config)
    steps = [r for r in read_log(Path(config["output_dir"]) / "trainer_log.jsonl") if r["step"] > 0]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-4) and steps[-1]["kl"] != 0


def test_a_reward_function_that_cannot_load_is_named(tmp_path, ppo_config, capsys):
    from lmtune.cli import main

    config = ppo_config | {"reward_model": "no_such_module:score"}
    assert main(["train", str(write_yaml(tmp_path / "bad.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "reward_model: cannot import no_such_module" in err and "my_rewards:score" in err


@pytest.mark.slow
def test_ctrl_c_during_ppo_saves_a_checkpoint_and_resumes(tmp_path, ppo_config):
    """A real SIGINT to a real `lmtune train` process: the iteration in progress finishes, is
    checkpointed, the process exits 130 saying how to resume, and the resumed run goes to the end."""
    config = ppo_config | {"max_steps": 4, "gradient_accumulation_steps": 1, "plot_loss": False}
    out = Path(config["output_dir"])
    proc = start_train(write_yaml(tmp_path / "run.yaml", config))
    wait_for_log_lines(out, 2, proc)  # the start's eval (step 0) and iteration 1
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "resume_from_checkpoint=auto" in stderr and "Traceback" not in stderr
    stopped = complete_checkpoints(out)[-1]
    at = int(stopped.name.split("-")[1])
    assert 1 <= at < 4 and f"stopped at iteration {at} of 4" in stderr
    assert (stopped / "value_head.safetensors").is_file() and not (out / "all_results.json").exists()
    results = train(tmp_path, config | {"resume_from_checkpoint": "auto"})
    assert results["global_step"] == 4
    assert [r["step"] for r in read_log(out / "trainer_log.jsonl")] == list(range(5))
