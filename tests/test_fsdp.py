"""FSDP2 (torch's fully_shard) on this CPU with gloo and 2 ranks: the same update as one process
with the same global batch, the final model gathered whole in HF/PEFT format, and sharded
checkpoints (torch.distributed.checkpoint) that resume bit-exact and re-shard into one process.

Each multi-process run starts two torch processes, so there are few of them and they are short.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.train.checkpoint import complete_checkpoints
from lmtune.train.logs import read_log
from tests.conftest import PAIRS, ROOT, wait_for_log_lines, write_json, write_yaml
from tests.test_distributed import EXAMPLES, _losses, _run_two_ranks


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _assert_same_losses(a_dir: Path, b_dir: Path) -> None:
    a, b = _losses(a_dir), _losses(b_dir)
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)


@pytest.mark.slow
def test_fsdp2_lora_equals_one_process_and_its_shards_resume_bit_exact(tmp_path, train_config):
    # 8 rows in micro-batches of 3: windows of 2 micro-batches, the last has one (rank 1 joins
    # the reduce-scatter at weight 0).
    base = train_config | {"per_device_train_batch_size": 3, "max_steps": 3, "save_steps": 2,
                           "plot_loss": False}
    one = tmp_path / "one"
    assert main(["train", str(write_yaml(tmp_path / "one.yaml", base | {
        "output_dir": str(one), "gradient_accumulation_steps": 2}))]) == 0
    sharded = base | {"fsdp": "full_shard"}
    two = tmp_path / "two"
    done = _run_two_ranks(write_yaml(tmp_path / "two.yaml", sharded | {"output_dir": str(two)}))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_losses(one, two)
    adapter = "adapter_model.safetensors"
    _assert_close(_weights(one, adapter), _weights(two, adapter))
    assert json.loads((two / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # The checkpoint holds each rank's shards (the default SHARDED_STATE_DICT), not whole weights.
    checkpoint = two / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "fsdp_shards").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / adapter).exists() and not (checkpoint / "optimizer.pt").exists()

    # Resumed on 2 ranks: bit for bit the uninterrupted run.
    resumed = tmp_path / "resumed"
    done = _run_two_ranks(write_yaml(tmp_path / "resume.yaml", sharded | {
        "output_dir": str(resumed), "resume_from_checkpoint": str(checkpoint)}))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(two, adapter), _weights(resumed, adapter)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _losses(resumed) == _losses(two)[2:]

    # Re-sharded into one process (same global batch: accumulation 2), without fsdp.
    alone = tmp_path / "alone"
    assert main(["train", str(write_yaml(tmp_path / "alone.yaml", base | {
        "output_dir": str(alone), "gradient_accumulation_steps": 2,
        "resume_from_checkpoint": str(checkpoint)}))]) == 0
    _assert_close(_weights(two, adapter), _weights(alone, adapter))


@pytest.mark.slow
def test_fsdp2_full_finetune_with_the_accelerate_example_saves_whole_hf_weights(tmp_path,
                                                                                 train_config):
    base = {k: v for k, v in train_config.items() if k != "lora_rank"} | {
        "finetuning_type": "full", "per_device_train_batch_size": 3, "max_steps": 2,
        "save_steps": 1, "plot_loss": False}
    one = tmp_path / "one"
    assert main(["train", str(write_yaml(tmp_path / "one.yaml", base | {
        "output_dir": str(one), "gradient_accumulation_steps": 2}))]) == 0
    two = tmp_path / "two"
    done = _run_two_ranks(write_yaml(tmp_path / "two.yaml", base | {
        "output_dir": str(two), "fsdp": "full_shard auto_wrap",
        "fsdp_config": str(EXAMPLES / "accelerate" / "fsdp2_config.yaml")}))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_losses(one, two)
    # Gathered whole on rank 0, in the one-process file's layout: the tied head is not repeated.
    _assert_close(_weights(one, "model.safetensors"), _weights(two, "model.safetensors"))
    # FULL_STATE_DICT: the checkpoint also holds the whole weights, beside the shards.
    checkpoint = two / "checkpoint-1"
    assert (checkpoint / "fsdp_shards").is_dir()
    assert _weights(checkpoint, "model.safetensors").keys() == _weights(one, "model.safetensors").keys()


def _start_two_ranks(config_path: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    # A session of its own: should the job hang, the test ends every process it started.
    return subprocess.Popen([sys.executable, "-m", "lmtune.cli", "train", str(config_path),
                             *extra, "--nproc", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the 2-rank job did not stop within {timeout} s:\n{err[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("engine,ctrl_c", [({}, False), ({"fsdp": "full_shard"}, True)],
                         ids=["ddp-sigterm", "fsdp2-ctrl-c"])
def test_a_stop_request_stops_both_ranks_with_one_checkpoint_and_the_run_resumes(
        tmp_path, train_config, engine, ctrl_c):
    config = train_config | engine | {"max_steps": 12, "save_steps": 100, "plot_loss": False}
    out = tmp_path / "out"
    path = write_yaml(tmp_path / "run.yaml", config | {"output_dir": str(out)})
    proc = _start_two_ranks(path)
    wait_for_log_lines(out, 1, proc, timeout=300)
    if ctrl_c:  # a terminal's Ctrl-C: SIGINT to the launcher, torchrun and both ranks at once
        os.killpg(proc.pid, signal.SIGINT)
    else:  # as a job scheduler would: SIGTERM to the launcher, which passes it to torchrun
        proc.send_signal(signal.SIGTERM)
    _, err = _finish(proc, timeout=180)
    assert proc.returncode == 130, err[-3000:]
    checkpoints = complete_checkpoints(out)
    assert len(checkpoints) == 1 and "resume_from_checkpoint=auto" in err
    stopped = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped < 12 and f"stopped at step {stopped} of 12" in err
    assert not (out / "all_results.json").exists()

    proc = _start_two_ranks(path, "resume_from_checkpoint=auto")
    _, err = _finish(proc, timeout=300)
    assert proc.returncode == 0, err[-3000:]
    steps = [r["step"] for r in read_log(out / "trainer_log.jsonl")]
    assert steps == list(range(1, 13))  # the steps before the stop, then the resumed ones, once
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 12


@pytest.mark.slow
def test_fsdp2_reward_model_equals_one_process_and_saves_its_head(tmp_path, tiny_model_dir):
    # rm's model is the LM plus a scalar head: both are sharded, and both are gathered to save.
    # (pt, dpo and kto go through the same loop, checked by hand the same way.)
    data = tmp_path / "data"
    write_json(data / "pairs.json", PAIRS)
    write_json(data / "dataset_info.json", {"pairs": {"file_name": "pairs.json", "ranking": True}})
    base = {"model_name_or_path": tiny_model_dir, "stage": "rm", "dataset": "pairs",
            "dataset_dir": str(data), "finetuning_type": "lora", "lora_rank": 4,
            "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_steps": 2,
            "logging_steps": 1, "save_steps": 100, "seed": 0, "plot_loss": False}
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(write_yaml(tmp_path / "one.yaml", base | {
        "output_dir": str(one), "gradient_accumulation_steps": 2}))]) == 0
    done = _run_two_ranks(write_yaml(tmp_path / "two.yaml", base | {
        "output_dir": str(two), "fsdp": "full_shard"}))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_losses(one, two)
    for name in ("adapter_model.safetensors", "scalar_head.safetensors"):
        _assert_close(_weights(one, name), _weights(two, name))
