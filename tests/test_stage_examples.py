"""The stage examples on the default model, each showing the effect it exists for on held-out data.
Slow: each trains SmolLM2-135M-Instruct for a minute or two on CPU. The tests cut the examples'
data with max_samples (which caps the held-out file too) to the fewest rows that still show the
effect, with a higher learning rate that makes up for the fewer steps; rm, dpo and kto take
micro-batches of 4 (more updates from the same tokens; ppo's cost is generation, which batches).
benchmarks/stage_examples.py runs the examples whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.train.logs import read_log

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, output_dir: Path, *overrides: str) -> dict:
    assert main(["train", str(EXAMPLES / f"{name}.yaml"), f"output_dir={output_dir}",
                 f"dataset_dir={EXAMPLES.parent / 'data'}", *overrides]) == 0
    return json.loads((output_dir / "all_results.json").read_text())


def test_pt_lowers_held_out_perplexity(tmp_path):
    results = run_example("pt", tmp_path / "pt", "max_samples=48")
    assert results["eval_perplexity"] < 0.7 * results["eval_perplexity_start"]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("stages") / "rm"
    return folder, run_example("rm", folder, "max_samples=32", "per_device_train_batch_size=4",
                               "learning_rate=1e-3")


def test_rm_ranks_held_out_pairs(reward_model):
    _, results = reward_model
    assert results["eval_accuracy"] >= 0.85 and results["eval_margin"] > 0


def test_ppo_raises_the_reward_of_held_out_answers(tmp_path, reward_model):
    folder, _ = reward_model
    results = run_example("ppo", tmp_path / "ppo", f"reward_model={folder}", "max_samples=48",
                          "learning_rate=4e-4")
    assert results["eval_reward"] > results["eval_reward_start"] + 1.0
    assert results["eval_kl"] > 0  # the price, reported on the same held-out answers
    records = read_log(tmp_path / "ppo" / "trainer_log.jsonl")
    assert all("kl" in r and "reward" in r for r in records if r["step"] > 0)


def test_dpo_raises_held_out_reward_accuracy_and_margin(tmp_path):
    results = run_example("dpo", tmp_path / "dpo", "max_samples=24", "num_train_epochs=1",
                          "per_device_train_batch_size=4", "learning_rate=6e-4")
    assert results["eval_reward_accuracy"] >= 0.85
    assert results["eval_reward_margin"] > results["eval_reward_margin_start"] + 1.0


def test_kto_moves_the_policy_toward_desirable_answers(tmp_path):
    results = run_example("kto", tmp_path / "kto", "max_samples=24",
                          "per_device_train_batch_size=4", "learning_rate=1e-3")
    assert results["eval_reward_desirable"] > 0 > results["eval_reward_undesirable"]
    assert results["eval_reward_desirable"] - results["eval_reward_undesirable"] > 1.0
