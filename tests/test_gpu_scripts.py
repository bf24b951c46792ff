"""The GPU benchmarks run on the CPU with --smoke (a tiny model, a few steps), so that a GPU session
finds them working: gpu_sft.py's contenders all train, and gpu_stages.py's runs all end well."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def smoke(script: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = next(line for line in done.stdout.splitlines() if line.startswith("wrote "))
    return json.loads(Path(written.removeprefix("wrote ")).read_text())


def test_gpu_sft_smoke_trains_every_contender():
    data = smoke("gpu_sft.py")
    names = [c["name"] for c in data["contenders"]]
    assert names == ["transformers Trainer + peft", "lmtune", "lmtune, sdpa attention",
                     "lmtune, whole logits", "lmtune, QLoRA 4-bit"]
    speeds = [c["tokens_per_second"] for c in data["contenders"]]
    assert all(s > 0 for s in speeds)
    # each lever keeps the math: the same rows in the same order, the same losses
    lmtune, sdpa, whole = data["contenders"][1:4]
    assert lmtune["mean_loss"] == pytest.approx(whole["mean_loss"], abs=1e-3)
    assert lmtune["mean_loss"] == pytest.approx(sdpa["mean_loss"], abs=1e-3)


def test_gpu_stages_smoke_ends_every_run_well():
    runs = smoke("gpu_stages.py")["runs"]
    assert len(runs) == 10 and all(r["ok"] for r in runs), [r for r in runs if not r["ok"]]
    losses = {r["run"]: r["train_loss"] for r in runs}
    # resuming from step 3 logs the same run as the uninterrupted one
    assert losses["sft, LoRA, resumed at step 3"] == pytest.approx(losses["sft, LoRA, packing"], abs=1e-6)
