"""Shared fixtures: the default model's real tokenizer and a tiny random model built on it.

The tiny model (2 layers, hidden 64) has the default model's architecture and vocabulary, so every
test runs the real tokenizer, chat template and forward/backward in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from lmtune.cli import main
from lmtune.models.load import load_tokenizer, resolve_model
from lmtune.runtime import configure

ROOT = Path(__file__).resolve().parent.parent

# The process set-up of every entry point: the suite runs library code as the CLI would.
configure()


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    return resolve_model("default")


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir, tokenizer, tmp_path_factory) -> str:
    config = AutoConfig.from_pretrained(default_model_dir)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return str(folder)


def method_model(model_dir: str, method: str = "lora", **keys) -> torch.nn.Module:
    """The model at `model_dir` in fp32 with `method` applied (LoRA: rank 4 on every linear layer),
    seeded; LoRA's B matrices random instead of zero, so that A gets a gradient too."""
    from lmtune.config import RunConfig
    from lmtune.models.methods import apply_method

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    model = apply_method(model, RunConfig(model_name_or_path=model_dir, finetuning_type=method,
                                          lora_rank=4, lora_target="all", **keys))
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


ALPACA = [
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour I like.",
     "system": "You answer briefly."},
    {"instruction": "And another?", "input": "", "output": "Green.",
     "history": [["Name a colour.", "Red."]]},
    {"instruction": "Count to five.", "input": "", "output": "One, two, three, four, five."},
    {"instruction": "What is the opposite of up?", "input": "", "output": "Down."},
    {"instruction": "Spell cat backwards.", "input": "", "output": "t-a-c"},
    {"instruction": "Give a fruit.", "input": "", "output": "An apple, crisp and red, is a fruit."},
]


QUESTIONS = ["Is the sky blue?", "Do fish swim?", "Is fire hot?", "Can birds fly?", "Is snow cold?",
             "Do cats purr?", "Is water wet?", "Do trees grow?", "Is sugar sweet?", "Do bees buzz?",
             "Is ice solid?", "Do dogs bark?"]
# Preference pairs (alpaca ranking layout) for rm, dpo and ppo's reward model.
PAIRS = [{"instruction": q, "input": "", "chosen": "Yes.", "rejected": "No."} for q in QUESTIONS]


def train(tmp_path: Path, config: dict) -> dict:
    """`lmtune train` on `config`, written to tmp_path/run.yaml; returns its all_results.json."""
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    return json.loads((Path(config["output_dir"]) / "all_results.json").read_text())


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_json(tmp_path / "data" / "tiny.json", ALPACA)


@pytest.fixture
def train_config(tmp_path, tiny_model_dir, alpaca_file) -> dict:
    """A complete config for a short SFT run on the tiny model; tests override what they study."""
    return {"model_name_or_path": tiny_model_dir, "dataset": str(alpaca_file),
            "output_dir": str(tmp_path / "out"), "finetuning_type": "lora", "lora_rank": 4,
            "per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_steps": 4,
            "logging_steps": 1, "save_steps": 100, "seed": 0}


def start_train(config_path: Path) -> subprocess.Popen:
    """`python -m lmtune.cli train config_path` as a real process (for tests that signal it)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "lmtune.cli", "train", str(config_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_log_lines(output_dir: Path, lines: int, proc: subprocess.Popen,
                       timeout: float = 120) -> None:
    """Until the run's trainer_log.jsonl holds `lines` records (the process must still run)."""
    log = output_dir / "trainer_log.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if log.is_file() and len(log.read_text().splitlines()) >= lines:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not log {lines} records")


@pytest.fixture
def ppo_config(tmp_path, tiny_model_dir) -> dict:
    """A short ppo run on the tiny model, rewarded by a function of the reply text."""
    data = write_json(tmp_path / "data" / "prompts.json", ALPACA * 3)
    return {"model_name_or_path": tiny_model_dir, "dataset": str(data), "stage": "ppo",
            "reward_model": "tests.ppo_rewards:letter_share", "output_dir": str(tmp_path / "out"),
            "finetuning_type": "lora", "lora_rank": 8, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "max_steps": 15,
            "max_new_tokens": 8, "val_size": 8, "logging_steps": 1, "save_steps": 100,
            "top_p": 1.0, "top_k": 0, "temperature": 1.0, "ppo_target": None, "seed": 0}


@pytest.fixture(scope="session")
def random_adapter(tiny_model_dir, tmp_path_factory) -> str:
    """A LoRA adapter whose B matrices are random, not zero, so it surely changes the answers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear",
                                                  init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir, tokenizer):
    """The tiny model in eval mode with the training encoder: what generation and scoring tests read."""
    from lmtune.data.encode import ChatEncoder
    from lmtune.models.load import stop_token_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, ChatEncoder(tokenizer, stop_token_ids(tokenizer, model), 4096)
