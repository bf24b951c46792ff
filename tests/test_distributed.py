"""Several processes (torchrun with gloo on this CPU, 2 ranks): the same run as one process with the
same global batch, written once; a failing rank ends the job with its own error.

Each multi-process test spawns two torch processes, so there are few of them and they are short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune import distributed
from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import ConfigError
from lmtune.train.logs import read_log
from tests.conftest import write_json, write_yaml

ROOT = Path(__file__).resolve().parent.parent


def test_rank_shares_cover_the_window_without_overlap(monkeypatch):
    window = [[0, 1], [2, 3], [4, 5]]
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        shares.append(distributed.rank_share(window))
    # Every rank runs as many micro-batches (sharded engines reduce in each backward): rank 1,
    # one short, re-runs the window's first at weight 0.
    assert shares == [[([0, 1], 1.0), ([4, 5], 1.0)], [([2, 3], 1.0), ([0, 1], 0.0)]]
    # A short last window: the rank without a micro-batch joins the all-reduce at weight 0.
    monkeypatch.setenv("RANK", "1")
    assert distributed.rank_share([[6, 7]]) == [([6, 7], 0.0)]


def _run_two_ranks(config_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "lmtune.cli", "train", str(config_path),
                           "--nproc", "2", *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _losses(output_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_log(output_dir / "trainer_log.jsonl")]


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, train_config):
    # 8 rows in micro-batches of 3 (3, 3, 2): global windows of 2 micro-batches, the last epoch
    # window has one, so rank 1 then only joins the all-reduce. Loss per target token over the
    # whole window on both ranks, so the update is the one-process update.
    base = train_config | {"per_device_train_batch_size": 3, "max_steps": 3, "save_steps": 2,
                           "logging_steps": 1, "plot_loss": False}
    one = tmp_path / "one"
    assert main(["train", str(write_yaml(tmp_path / "one.yaml", base | {
        "output_dir": str(one), "gradient_accumulation_steps": 2}))]) == 0
    two = tmp_path / "two"
    done = _run_two_ranks(write_yaml(tmp_path / "two.yaml", base | {"output_dir": str(two)}))
    assert done.returncode == 0, done.stderr[-3000:]

    losses_one, losses_two = _losses(one), _losses(two)
    assert [s for s, *_ in losses_two] == [1, 2, 3]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(losses_one, losses_two):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)
    _assert_same_weights(one, two)
    # Written once: one log line per step, one checkpoint holding both ranks' random states.
    checkpoint = two / "checkpoint-2"
    assert (checkpoint / "rng_state.pt").is_file() and (checkpoint / "rng_state_1.pt").is_file()
    assert (two / "all_results.json").is_file() and "done:" in done.stdout
    assert done.stderr.count("trainable parameters:") == 1

    # The 2-rank checkpoint resumes in one process with the same global batch (3 x 2 x 1 now):
    # the state is whole on every rank and the data order depends only on the global window.
    resumed = tmp_path / "resumed"
    assert main(["train", str(write_yaml(tmp_path / "resume.yaml", base | {
        "output_dir": str(resumed), "gradient_accumulation_steps": 2,
        "resume_from_checkpoint": str(checkpoint)}))]) == 0
    _assert_same_weights(two, resumed)


def test_resume_with_another_global_batch_is_refused(tmp_path, train_config, capsys):
    base = train_config | {"max_steps": 2, "save_steps": 1, "plot_loss": False}
    out = tmp_path / "out"
    assert main(["train", str(write_yaml(tmp_path / "a.yaml", base | {"output_dir": str(out)}))]) == 0
    again = base | {"output_dir": str(tmp_path / "b"), "gradient_accumulation_steps": 2,
                    "resume_from_checkpoint": str(out / "checkpoint-1")}
    assert main(["train", str(write_yaml(tmp_path / "b.yaml", again))]) == 2
    err = capsys.readouterr().err
    assert "global batch of 2 rows per step" in err and "this run has 4" in err


# Rank 1 gets a config that fails after the process group is up (its method cannot be applied),
# while rank 0 goes on into the first collective.
_ONE_RANK_FAILS = """
import os, sys
from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import ConfigError
args = sys.argv[1:]
if os.environ["RANK"] == "1":
    args.append("lora_target=no_such_module")
sys.exit(main(args))
"""


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, train_config):
    config = write_yaml(tmp_path / "run.yaml", train_config | {"output_dir": str(tmp_path / "out"),
                                                               "ddp_timeout": 60})
    script = tmp_path / "one_rank_fails.py"
    script.write_text(_ONE_RANK_FAILS)
    with pytest.raises(distributed.RankFailed) as info:
        distributed.launch(2, [str(script), "train", str(config)])
    assert info.value.message.startswith("rank 1 of 2:")
    assert "no_such_module" in info.value.message


# --- sharded engines: what is parsed, and what this CPU machine refuses -------------------------

EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("name,stage,offload", [
    ("ds_z2_config.json", 2, None), ("ds_z3_config.json", 3, None),
    ("ds_z3_offload_config.json", 3, "cpu")])
def test_deepspeed_examples_parse(name, stage, offload):
    cfg = build_config({"deepspeed": str(EXAMPLES / "deepspeed" / name)})
    assert distributed.deepspeed_settings(cfg) == {
        "stage": stage, "offload_optimizer": offload, "offload_param": offload}


@pytest.mark.parametrize("keys, words", [
    ({"use_muon": True, "finetuning_type": "full"}, ["with Muon", "flat slices"]),
    ({"optim": "adafactor"}, ["with Adafactor"]),
    ({"finetuning_type": "adalora"}, ["adalora", "partitioned"]),
    ({"pure_bf16": True, "bf16": True}, ["pure_bf16"]),
])
def test_what_zero_cannot_run_is_refused_over_several_ranks(monkeypatch, keys, words):
    cfg = build_config({"deepspeed": str(EXAMPLES / "deepspeed" / "ds_z2_config.json")} | keys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        distributed.engine(cfg)
    assert "ZeRO stage 2" in info.value.message
    assert all(word in info.value.message for word in words), info.value.message


def test_deepspeed_over_several_ranks_is_its_engine(monkeypatch):
    cfg = build_config({"deepspeed": str(EXAMPLES / "deepspeed" / "ds_z3_config.json")})
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.engine(cfg) == "deepspeed"


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_a_deepspeed_file_with_its_own_optimizer_or_schedule_is_refused(tmp_path, section):
    path = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 2},
                                             section: {"type": "AdamW", "params": {}}})
    with pytest.raises(ConfigError) as info:
        distributed.deepspeed_settings(build_config({"deepspeed": str(path)}))
    assert f"sets its own {section}" in info.value.message
    assert f"remove the {section} section" in info.value.fix


def test_the_deepspeed_file_is_filled_from_the_yaml(monkeypatch):
    from lmtune.train import zero

    cfg = build_config({"deepspeed": str(EXAMPLES / "deepspeed" / "ds_z3_offload_config.json"),
                        "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                        "max_grad_norm": 0.5})
    monkeypatch.setenv("WORLD_SIZE", "2")
    resolved = zero.config(cfg, hidden_size=64)
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"],
            resolved["train_batch_size"], resolved["gradient_clipping"]) == (3, 2, 12, 0.5)
    assert resolved["bf16"]["enabled"] is False and resolved["fp16"]["enabled"] is False
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    # On the CPU there is nothing to offload to: the offload sections are dropped.
    assert "offload_optimizer" not in resolved["zero_optimization"]


@pytest.mark.parametrize("keys, words", [
    ({"use_badam": True, "finetuning_type": "full"}, ["use_badam runs in one process"]),
    ({"use_galore": True, "galore_layerwise": True, "finetuning_type": "full"},
     ["galore_layerwise runs in one process", "before DDP has averaged"]),
])
def test_optimizers_that_step_outside_ddps_averaging_are_refused_over_several_ranks(monkeypatch, keys,
                                                                                     words):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        distributed.init(build_config(keys))
    assert all(word in info.value.message for word in words), info.value.message


@pytest.mark.parametrize("name", ["ds_z3_config.json", "ds_z3_offload_config.json"])
def test_deepspeed_in_one_cpu_process_runs_as_one_process_and_says_so(name, capsys):
    # LLaMA-Factory's ZeRO examples on one CPU process: nothing to partition or offload.
    cfg = build_config({"deepspeed": str(EXAMPLES / "deepspeed" / name)})
    assert distributed.engine(cfg) == "single"
    distributed.init(cfg)
    assert "is not applied in one process" in capsys.readouterr().out


def test_deepspeed_file_disagreeing_with_the_run_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8,
                                "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError) as info:
        distributed.deepspeed_settings(build_config({"deepspeed": str(path)}))
    assert "train_micro_batch_size_per_gpu: 8" in info.value.message and '"auto"' in info.value.fix


def test_fsdp2_example_parses(monkeypatch):
    cfg = build_config({"fsdp": "full_shard auto_wrap",
                        "fsdp_config": str(EXAMPLES / "accelerate" / "fsdp2_config.yaml")})
    settings = distributed.fsdp_settings(cfg)
    assert settings["reshard_after_forward"] is True and settings["cpu_offload"] is False
    assert settings["layer_classes"] == ["LlamaDecoderLayer"]
    assert settings["state_dict_type"] == "FULL_STATE_DICT"
    shard_grad_op = distributed.fsdp_settings(build_config({"fsdp": "shard_grad_op offload"}))
    assert shard_grad_op["reshard_after_forward"] is False and shard_grad_op["cpu_offload"] is True
    assert shard_grad_op["state_dict_type"] == "SHARDED_STATE_DICT"
    # torch's fully_shard runs on gloo: FSDP2 is this CPU's engine too, not quietly DDP.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.engine(cfg) == "fsdp2"
    with pytest.raises(ConfigError) as info:
        distributed.engine(cfg.model_copy(update={"quantization_bit": 4}))
    assert "quantization_bit" in info.value.message


def test_accelerate_launch_fsdp_environment_is_read(monkeypatch):
    # What `accelerate launch --config_file examples/accelerate/fsdp2_config.yaml` exports.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_VERSION", "2")
    settings = distributed.fsdp_settings(build_config({}))
    assert settings["layer_classes"] == ["LlamaDecoderLayer"]
    assert settings["reshard_after_forward"] is False
    with distributed.accelerate_without_engines():
        assert "ACCELERATE_USE_FSDP" not in os.environ
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"


def test_accelerate_launch_deepspeed_environment_is_read(monkeypatch):
    # What `accelerate launch` exports for a config with deepspeed_config_file.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:  # ZeRO settings without a file
        distributed.engine(build_config({}))
    assert "no DeepSpeed config file" in info.value.message
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE",
                       str(EXAMPLES / "deepspeed" / "ds_z3_config.json"))
    cfg = build_config({})
    assert distributed.deepspeed_settings(cfg)["stage"] == 3
    assert distributed.engine(cfg) == "deepspeed"
    with distributed.accelerate_without_engines():
        assert "ACCELERATE_USE_DEEPSPEED" not in os.environ
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"


def test_fsdp_version_1_is_refused():
    with pytest.raises(ConfigError) as info:
        distributed.fsdp_settings(build_config({"fsdp": "full_shard",
                                                "fsdp_config": {"fsdp_version": 1}}))
    assert "FSDP2" in info.value.message


def test_ppo_under_several_processes_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        distributed.init(build_config({"stage": "ppo", "reward_model": "x"}))
    assert "rollouts" in info.value.message


def test_plan_for_several_processes(tmp_path, train_config, capsys, monkeypatch):
    monkeypatch.setattr("lmtune.data.cache.cache_dir", lambda: tmp_path / "cache")
    full = {k: v for k, v in train_config.items() if k != "lora_rank"}
    config = write_yaml(tmp_path / "plan.yaml", full | {
        "max_steps": -1, "num_train_epochs": 1.0, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "finetuning_type": "full"})
    assert main(["plan", str(config), "--json", "--world-size", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    s = plan["schedule"]
    # 8 rows, 2 per device x 2 accumulation x 2 processes: one step of 8 rows per epoch.
    assert (s["effective_batch"], s["world_size"], s["steps_per_epoch"]) == (8, 2, 1)
    memory, per_rank = plan["model"]["memory_gib"], plan["model"]["memory_per_rank_gib"]
    assert per_rank["ddp"] == pytest.approx(memory["total"], abs=2e-3)
    # Sharding saves memory; offloading saves more. (ZeRO-3 gathers the tiny model's embedding,
    # most of its weights, whole: here it is not below ZeRO-2.)
    assert per_rank["ddp"] > per_rank["fsdp2_shard_grad_op_or_zero2"] > per_rank["zero2_offload"]
    assert per_rank["ddp"] > per_rank["fsdp2_full_shard_or_zero3"] > per_rank["zero3_offload"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["plan", str(config)]) == 0
    assert "effective batch 16 = 2 per device x 2 accumulation x 4 processes" in capsys.readouterr().out
