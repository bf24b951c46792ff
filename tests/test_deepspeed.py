"""DeepSpeed ZeRO on this CPU (DeepSpeed's CPU accelerator, gloo) with 2 ranks: the same update as
one process with the same global batch, the final model gathered whole in HF/PEFT format, and
checkpoints of each rank's partitions that resume bit-exact.

Each multi-process run starts two torch processes, so there are few of them and they are short.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmtune.cli import main
from tests.conftest import write_yaml
from tests.test_distributed import EXAMPLES, _losses, _run_two_ranks
from tests.test_fsdp import _assert_close, _assert_same_losses, _weights

ADAPTER = "adapter_model.safetensors"


@pytest.mark.slow
def test_zero2_lora_equals_one_process_and_its_partitions_resume_bit_exact(tmp_path, train_config):
    # 8 rows in micro-batches of 3, accumulation 2 over 2 ranks: windows of 3 micro-batches (one
    # rank runs two, the other one and a weight-0 re-run), ZeRO-2 reducing in every backward.
    base = train_config | {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                           "max_steps": 3, "save_steps": 2, "plot_loss": False}
    one = tmp_path / "one"
    assert main(["train", str(write_yaml(tmp_path / "one.yaml", base | {
        "output_dir": str(one), "gradient_accumulation_steps": 4}))]) == 0
    zero2 = base | {"deepspeed": str(EXAMPLES / "deepspeed" / "ds_z2_config.json")}
    two = tmp_path / "two"
    done = _run_two_ranks(write_yaml(tmp_path / "two.yaml", zero2 | {"output_dir": str(two)}))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_losses(one, two)
    _assert_close(_weights(one, ADAPTER), _weights(two, ADAPTER))

    # The checkpoint: each rank's optimizer partition (no frozen base repeated), and the adapter.
    checkpoint = two / "checkpoint-2"
    partitions = sorted(p.name for p in (checkpoint / "deepspeed" / "zero").glob("*optim_states.pt"))
    assert len(partitions) == 2, partitions
    assert (checkpoint / ADAPTER).is_file() and not (checkpoint / "optimizer.pt").exists()

    resumed = tmp_path / "resumed"
    done = _run_two_ranks(write_yaml(tmp_path / "resume.yaml", zero2 | {
        "output_dir": str(resumed), "resume_from_checkpoint": str(checkpoint)}))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(two, ADAPTER), _weights(resumed, ADAPTER)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _losses(resumed) == _losses(two)[2:]

    # Partitions cut for 2 ranks are not resumed by one process: refused before a weight moves.
    alone = tmp_path / "alone"
    assert main(["train", str(write_yaml(tmp_path / "alone.yaml", base | {
        "output_dir": str(alone), "gradient_accumulation_steps": 4,
        "resume_from_checkpoint": str(checkpoint)}))]) == 2


@pytest.mark.slow
def test_zero3_full_finetune_gathers_whole_hf_weights_equal_to_one_process(tmp_path, train_config):
    base = {k: v for k, v in train_config.items() if k != "lora_rank"} | {
        "finetuning_type": "full", "per_device_train_batch_size": 2, "max_steps": 2,
        "save_steps": 1, "plot_loss": False, "learning_rate": 1e-4}
    one = tmp_path / "one"
    assert main(["train", str(write_yaml(tmp_path / "one.yaml", base | {
        "output_dir": str(one), "gradient_accumulation_steps": 2}))]) == 0
    two = tmp_path / "two"
    done = _run_two_ranks(write_yaml(tmp_path / "two.yaml", base | {
        "output_dir": str(two), "deepspeed": str(EXAMPLES / "deepspeed" / "ds_z3_config.json")}))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_losses(one, two)
    # Gathered whole from the partitions, in the one-process file's layout.
    _assert_close(_weights(one, "model.safetensors"), _weights(two, "model.safetensors"))
    checkpoint = two / "checkpoint-1"
    assert _weights(checkpoint, "model.safetensors").keys() == \
        _weights(one, "model.safetensors").keys()
    layout = json.loads((checkpoint / "deepspeed" / "lmtune_layout.json").read_text())
    assert layout == {"world_size": 2, "stage": 3}
