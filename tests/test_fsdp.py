"""FSDP2 (torch's fully_shard) on this CPU with gloo and 2 ranks: the same update as one process
with the same global batch, the final model gathered whole in HF/PEFT format, and sharded
checkpoints (torch.distributed.checkpoint) that resume bit-exact and re-shard into one process.

Each multi-process run starts two torch processes, so there are few of them and they are short.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from tests.conftest import write_yaml
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
