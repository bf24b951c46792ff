"""A training process loads only what its run uses: bitsandbytes (which peft imports whenever it is
installed) stays out of a run with no quantization and no 8-bit optimizer, and still loads and
trains for one that has them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmtune import runtime
from lmtune.config import build_config
from tests.conftest import ROOT, write_yaml


def imported_modules(tmp_path, config: dict) -> set[str]:
    """Every module `lmtune train` imports for config, from Python's import-time report."""
    env = os.environ | {"PYTHONPROFILEIMPORTTIME": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "lmtune.cli", "train",
                           str(write_yaml(tmp_path / "run.yaml", config))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_bitsandbytes_loads_only_for_runs_that_use_it(tmp_path, train_config):
    plain = imported_modules(tmp_path / "plain", train_config | {"output_dir": str(tmp_path / "a")})
    assert "peft" in plain and not any(m.startswith("bitsandbytes.") for m in plain)
    quantized = imported_modules(tmp_path / "qlora", train_config | {
        "output_dir": str(tmp_path / "b"), "quantization_bit": 4})
    assert "bitsandbytes.nn" in quantized
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("keys, kept", [
    ({}, False),
    ({"quantization_bit": 4}, True),
    ({"optim": "paged_adamw_8bit"}, True),
    ({"model_name_or_path": "{prequantized}"}, True),
    ({"model_name_or_path": "nobody/never-downloaded"}, True),  # its config cannot be read
    ({"stage": "ppo", "reward_model": "tests.ppo_rewards:letter_share"}, False),
])
def test_bitsandbytes_stays_where_a_run_may_need_it(tmp_path, tiny_model_dir, monkeypatch, keys, kept):
    prequantized = tmp_path / "prequantized"
    prequantized.mkdir()
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    (prequantized / "config.json").write_text(json.dumps(
        config | {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    keys = {k: v.format(prequantized=prequantized) if isinstance(v, str) else v for k, v in keys.items()}
    modules: dict = {}  # the process's sys.modules stands apart: this test only reads the decision
    monkeypatch.setattr(runtime, "sys", SimpleNamespace(modules=modules))
    cfg = build_config({"model_name_or_path": tiny_model_dir} | keys)
    assert runtime.leave_out_bitsandbytes(cfg) is (not kept)
    assert modules == ({} if kept else {"bitsandbytes": None})


@pytest.mark.parametrize("user_value", [None, "512"])
def test_onednn_keeps_a_bounded_cache_of_compiled_matmuls(monkeypatch, user_value):
    # oneDNN (torch's CPU bf16 matmuls) reads the bound from the environment when it first
    # compiles; configure() sets it unless the user did (what it saves: memory_levers.py)
    if user_value is None:
        monkeypatch.delenv(runtime.ONEDNN_CACHE, raising=False)
    else:
        monkeypatch.setenv(runtime.ONEDNN_CACHE, user_value)
    runtime.configure()
    assert os.environ[runtime.ONEDNN_CACHE] == (user_value or "64")
