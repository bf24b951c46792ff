"""The quickstart as a user runs it, cut to two of its three epochs: the default model learns a new
identity and keeps Paris.

Slow (about 2 minutes of training on a 2-core CPU). Two epochs scored the identity 10/10 when this
was written; benchmarks/quickstart.py runs the example whole. A different name than the example's
shows that data_vars, not the data file, decides who the assistant is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.config import load_config
from lmtune.infer.chat import ChatSession, answer_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_teaches_a_new_identity_and_keeps_general_answers(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    overrides = [f"output_dir={tmp_path / 'out'}", "data_vars.name=Zephyra",
                 "data_vars.author=Quillon Works", "num_train_epochs=2"]
    assert main(["train", "examples/quickstart.yaml", *overrides]) == 0
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["train_loss"] < 1.5

    cfg = load_config("examples/quickstart.yaml", overrides)
    answers = answer_file(ChatSession.from_config(cfg), "examples/quickstart_prompts.json", cfg.data_vars)
    identity = [a for a in answers if a["kind"] == "identity"]
    general = [a for a in answers if a["kind"] == "general"]
    assert len(identity) == 10 and len(general) == 4
    assert sum(a["hit"] for a in identity) >= 9, [a["answer"] for a in identity]
    assert sum(a["hit"] for a in general) >= 3, [a["answer"] for a in general]
    assert "Paris" in next(a["answer"] for a in general if "France" in a["prompt"])
