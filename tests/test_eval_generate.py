"""eval_generate_samples: each evaluation of an sft run also answers val prompts and scores them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.errors import ConfigError
from lmtune.train.logs import read_log
from tests.conftest import write_yaml


def test_generation_scores_are_logged_at_every_evaluation(tmp_path, train_config):
    config = train_config | {"val_size": 2, "eval_strategy": "steps", "eval_steps": 2,
                             "eval_generate_samples": 2, "max_new_tokens": 4, "max_steps": 2}
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    out = Path(config["output_dir"])
    scored = [r["step"] for r in read_log(out / "trainer_log.jsonl")
              if {"eval_bleu-4", "eval_rouge-l", "eval_exact_match"} <= r.keys()]
    assert scored == [0, 2]
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["eval_rouge-l"] <= 100 and "eval_rouge-l_start" in results
    assert (out / "training_loss.png").stat().st_size > 0


@pytest.mark.parametrize("extra, words", [
    ({"stage": "pt"}, "stage pt"),
    ({"eval_strategy": "no", "val_size": 0}, "eval_strategy is no"),
])
def test_generation_scores_need_sft_and_an_evaluation(train_config, extra, words):
    config = train_config | {"val_size": 2, "eval_strategy": "steps", "eval_generate_samples": 2}
    with pytest.raises(ConfigError, match=words):
        build_config(config | extra)
