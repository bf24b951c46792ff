"""Interrupted runs: Ctrl-C/SIGTERM save and stop; SIGKILL loses nothing; resume is bit-exact."""

from __future__ import annotations

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
from tests.conftest import ROOT, start_train, wait_for_log_lines, write_yaml


def _config(train_config: dict, output_dir: Path) -> dict:
    return train_config | {"output_dir": str(output_dir), "max_steps": 80, "save_steps": 7,
                           "gradient_accumulation_steps": 2, "lora_dropout": 0.1,
                           "logging_steps": 1, "plot_loss": False}


def _trajectory(output_dir: Path) -> list[tuple]:
    records = read_log(output_dir / "trainer_log.jsonl")
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_config_module):
    root = tmp_path_factory.mktemp("uninterrupted")
    config = _config(train_config_module, root / "out")
    assert main(["train", str(write_yaml(root / "run.yaml", config))]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def train_config_module(tmp_path_factory, tiny_model_dir):
    from tests.conftest import ALPACA, write_json

    data = write_json(tmp_path_factory.mktemp("data") / "tiny.json", ALPACA)
    return {"model_name_or_path": tiny_model_dir, "dataset": str(data), "finetuning_type": "lora",
            "lora_rank": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "seed": 0}


def _assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    assert _trajectory(resumed) == _trajectory(uninterrupted)
    a = load_file(uninterrupted / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, train_config_module, uninterrupted,
                                                          sig):
    out = tmp_path / "out"
    config_path = write_yaml(tmp_path / "run.yaml", _config(train_config_module, out))
    proc = start_train(config_path)
    wait_for_log_lines(out, 10, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "resume_from_checkpoint=auto" in stderr and "Traceback" not in stderr
    stopped_at = int(complete_checkpoints(out)[-1].name.split("-")[1])
    assert 10 <= stopped_at < 80 and f"stopped at step {stopped_at} of 80" in stderr

    resumed = _config(train_config_module, out) | {"resume_from_checkpoint": "auto"}
    assert main(["train", str(write_yaml(tmp_path / "resume.yaml", resumed))]) == 0
    _assert_same_run(out, uninterrupted)


@pytest.mark.parametrize("kill_at_step", [3, 16, 40])
def test_sigkill_then_resume_is_bit_exact(tmp_path, train_config_module, uninterrupted, kill_at_step):
    out = tmp_path / "out"
    config_path = write_yaml(tmp_path / "run.yaml", _config(train_config_module, out))
    proc = start_train(config_path)
    wait_for_log_lines(out, kill_at_step, proc)
    proc.kill()  # SIGKILL: no handler runs, whatever the run was doing (a step, a write) stops
    proc.communicate(timeout=60)

    resumed = _config(train_config_module, out) | {"resume_from_checkpoint": "auto"}
    if not complete_checkpoints(out):  # killed before the first checkpoint: start over
        resumed = _config(train_config_module, out) | {"overwrite_output_dir": True}
    assert main(["train", str(write_yaml(tmp_path / "resume.yaml", resumed))]) == 0
    _assert_same_run(out, uninterrupted)


# Kill the process at a precise point of a checkpoint write: the files staged but not yet renamed
# into place, or renamed but not yet marked complete.
_KILL_DURING_WRITE = """
import os, sys
import lmtune.train.checkpoint as c
target = sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), 9)
if target == "before-rename":
    original = c.os.replace
    c.os.replace = lambda src, dst: die() if "checkpoint-14" in str(dst) else original(src, dst)
else:
    original = c.json.dumps
    c.json.dumps = lambda obj, **kw: die() if obj == {"step": 14} else original(obj, **kw)
from lmtune.cli import main
main(["train", sys.argv[1]])
"""


@pytest.mark.parametrize("point", ["before-rename", "before-marker"])
def test_kill_during_checkpoint_write_then_resume(tmp_path, train_config_module, uninterrupted, point):
    out = tmp_path / "out"
    config_path = write_yaml(tmp_path / "run.yaml", _config(train_config_module, out))
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_WRITE, str(config_path), point],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-7"]
    leftovers = {p.name for p in out.iterdir()} & {".checkpoint-14.staging", "checkpoint-14"}
    assert leftovers  # the half-written checkpoint is there, and must be ignored

    resumed = _config(train_config_module, out) | {"resume_from_checkpoint": "auto"}
    assert main(["train", str(write_yaml(tmp_path / "resume.yaml", resumed))]) == 0
    _assert_same_run(out, uninterrupted)
