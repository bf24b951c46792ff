"""Stages pt, rm, dpo and kto under DDP and under DeepSpeed ZeRO-2 (torchrun with gloo on this
CPU, 2 ranks): the same losses and final weights as one process with the same global batch. Their normalisers (pairs, answers),
reference log-probs computed before the first update and kto's KL reference point from mismatched
pairs must all come out the same whichever rank a row lands on; and every trainable parameter
must get a gradient (rm with a full, untied model: the LM's own head never runs).

One torchrun job trains the stages one after the other under each engine, so its processes start
once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from lmtune import distributed
from lmtune.cli import main
from lmtune.train.logs import read_log
from tests.conftest import PAIRS, QUESTIONS, write_json, write_yaml
from tests.test_distributed import EXAMPLES

KTO = [{"messages": [{"role": "user", "content": q},
                     {"role": "assistant", "content": "Yes." if i % 3 else "No."}],
        "label": i % 3 != 0} for i, q in enumerate(QUESTIONS)]
TEXT = [f"The river Alder runs past the town of Merrow number {i} and the mill." for i in range(12)]

# Every rank trains each config in turn, as `lmtune train` would.
_TRAIN_EACH = """
import sys
from lmtune.cli import main
for config in sys.argv[1:]:
    code = main(["train", config])
    if code:
        sys.exit(code)
"""

STAGES = {
    "pt": {"dataset": "corpus", "cutoff_len": 48},
    "rm": {"dataset": "pairs"},
    "dpo": {"dataset": "pairs", "pref_loss": "sigmoid"},
    "kto": {"dataset": "kto", "kto_rejected_weight": 1.5},
    # The LM's own head never runs under a reward head: untied and trainable, it would get no
    # gradient and DDP would stop at step 2, still expecting one.
    "rm-full-untied": {"dataset": "pairs", "stage": "rm", "finetuning_type": "full",
                       "learning_rate": 1e-4},
}
# The two-rank runs: plain DDP, and DeepSpeed ZeRO-2 with LLaMA-Factory's example file (with a
# checkpoint after step 1, which holds DeepSpeed's partitions).
ENGINES = {"ddp": {}, "zero2": {"deepspeed": str(EXAMPLES / "deepspeed" / "ds_z2_config.json"),
                                "save_steps": 1}}


def _untied_model(tiny_model_dir: str, tokenizer, folder: Path) -> str:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _trained(folder: Path) -> dict[str, torch.Tensor]:
    adapter = folder / "adapter_model.safetensors"
    weights = load_file(adapter if adapter.is_file() else folder / "model.safetensors")
    if (folder / "scalar_head.safetensors").is_file():
        weights |= {f"head.{k}": v for k, v in load_file(folder / "scalar_head.safetensors").items()}
    return weights


@pytest.mark.slow
def test_pt_rm_dpo_kto_on_two_ranks_under_ddp_and_zero2_equal_one_process(tmp_path, tiny_model_dir,
                                                                         tokenizer):
    data = tmp_path / "data"
    # 12 pairs / answers, 3 held out: 9 in micro-batches of 3 make windows of 2 micro-batches and
    # a last one of 1, so rank 1 also joins a step at weight 0; kto's rows mix both labels within
    # a micro-batch.
    write_json(data / "pairs.json", PAIRS)
    write_json(data / "kto.json", KTO)
    (data / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    write_json(data / "dataset_info.json", {
        "pairs": {"file_name": "pairs.json", "ranking": True},
        "kto": {"file_name": "kto.json", "formatting": "openai", "columns": {"kto_tag": "label"}},
        "corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}})
    base = {"model_name_or_path": tiny_model_dir, "dataset_dir": str(data),
            "finetuning_type": "lora", "lora_rank": 4, "per_device_train_batch_size": 3,
            "learning_rate": 1e-2, "max_steps": 2, "logging_steps": 1, "save_steps": 100,
            "seed": 0, "plot_loss": False, "val_size": 3}

    untied = _untied_model(tiny_model_dir, tokenizer, tmp_path / "untied")
    two_configs = []
    for name, keys in STAGES.items():
        config = base | {"stage": name} | keys
        if config["finetuning_type"] == "full":
            config = {k: v for k, v in config.items() if k != "lora_rank"} | {
                "model_name_or_path": untied}
        assert main(["train", str(write_yaml(tmp_path / f"{name}-one.yaml", config | {
            "output_dir": str(tmp_path / f"{name}-one"), "gradient_accumulation_steps": 2}))]) == 0
        two_configs += [str(write_yaml(tmp_path / f"{name}-{engine}.yaml", config | keys | {
            "output_dir": str(tmp_path / f"{name}-{engine}")})) for engine, keys in ENGINES.items()]
    script = tmp_path / "train_each.py"
    script.write_text(_TRAIN_EACH)
    distributed.launch(2, [str(script), *two_configs])

    for name, engine in [(name, engine) for name in STAGES for engine in ENGINES]:
        one, two = tmp_path / f"{name}-one", tmp_path / f"{name}-{engine}"
        name = f"{name} under {engine}"
        assert (two / "checkpoint-1" / "deepspeed").is_dir() == (engine == "zero2"), name
        # Loss, gradient norm and the stage's metrics (accuracy, margins, rewards, kl) per step.
        log_one, log_two = (read_log(d / "trainer_log.jsonl") for d in (one, two))
        assert [r["step"] for r in log_two] == [1, 2], name
        for a, b in zip(log_one, log_two):
            assert a.keys() == b.keys(), name
            for key in a.keys() - {"tokens_per_second"}:
                rel = 1e-5 if key == "loss" else 1e-4
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), f"{name} {key}"
        # The final evaluation: every rank scores the whole val split against its reference log-probs.
        results_one, results_two = (json.loads((d / "all_results.json").read_text())
                                    for d in (one, two))
        assert "eval_loss" in results_one, name
        for key in [k for k in results_one if k.startswith("eval_")] + ["train_loss"]:
            assert results_two[key] == pytest.approx(results_one[key], rel=1e-5), f"{name} {key}"
        a, b = _trained(one), _trained(two)
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
