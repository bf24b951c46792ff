"""Every stage and method family of `lmtune train` on this machine's GPU, in bf16: the CUDA path of
the loop, checked in a minute.

A 2-layer Llama-shaped model with random weights (the default model's config and tokenizer, or
--base's) trains 6 steps per run, saving at step 3, on the test suite's data: sft (LoRA with
packing, then resumed from its step-3 checkpoint; QLoRA 4-bit; full in pure bf16; freeze with
gradient checkpointing), pt (full), rm, dpo, kto and ppo (LoRA). Each run reports whether it ended
well, its train loss and its peak GPU memory; any failure's traceback is printed and the script
exits non-zero.

    python benchmarks/gpu_stages.py            # on a GPU machine: writes benchmarks/results/gpu_stages.json
    python benchmarks/gpu_stages.py --smoke    # the same on the CPU (bf16 autocast), into a scratch folder
    python benchmarks/gpu_stages.py --base F   # config and tokenizer from folder F, not the default model
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from _harness import ROOT, TINY_SHAPE, Bench, gpu_bench, random_model, source_line, table

sys.path.insert(0, str(ROOT))
from tests.conftest import ALPACA, PAIRS, write_json, write_yaml  # noqa: E402
from tests.test_stages import KTO, TEXT  # noqa: E402

def write_data(folder: Path) -> Path:
    write_json(folder / "alpaca.json", ALPACA * 3)
    write_json(folder / "pairs.json", PAIRS)
    write_json(folder / "kto.json", KTO)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    write_json(folder / "dataset_info.json", {
        "alpaca": {"file_name": "alpaca.json"}, "pairs": {"file_name": "pairs.json", "ranking": True},
        "kto": {"file_name": "kto.json", "formatting": "openai", "columns": {"kto_tag": "label"}},
        "corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}})
    return folder


def runs(scratch: Path) -> dict[str, dict]:
    """Each run's keys over the shared ones; `output_dir` names another run's folder to resume."""
    return {
        "sft, LoRA, packing": {"stage": "sft", "dataset": "alpaca", "packing": True, "cutoff_len": 128},
        "sft, LoRA, resumed at step 3": {
            "stage": "sft", "dataset": "alpaca", "packing": True, "cutoff_len": 128,
            "output_dir": "sft, LoRA, packing",
            "resume_from_checkpoint": str(scratch / "sft-LoRA-packing" / "checkpoint-3")},
        "sft, QLoRA 4-bit": {"stage": "sft", "dataset": "alpaca", "quantization_bit": 4},
        "sft, full, pure bf16": {"stage": "sft", "dataset": "alpaca", "finetuning_type": "full",
                                 "pure_bf16": True},
        "sft, freeze, checkpointing": {"stage": "sft", "dataset": "alpaca", "finetuning_type": "freeze",
                                       "gradient_checkpointing": True},
        "pt, full": {"stage": "pt", "dataset": "corpus", "finetuning_type": "full", "cutoff_len": 64},
        "rm, LoRA": {"stage": "rm", "dataset": "pairs"},
        "dpo, LoRA": {"stage": "dpo", "dataset": "pairs"},
        "kto, LoRA": {"stage": "kto", "dataset": "kto"},
        "ppo, LoRA": {"stage": "ppo", "dataset": "alpaca", "reward_model": "tests.ppo_rewards:letter_share",
                      "max_new_tokens": 8, "top_p": 1.0, "top_k": 0, "temperature": 1.0},
    }


def folder_name(run: str) -> str:
    return run.replace(",", "").replace(" ", "-")


def measure(bench: Bench) -> dict:
    from lmtune.cli import main

    cuda = torch.cuda.is_available()
    model = random_model(bench.scratch / "model", TINY_SHAPE, bench.args.base)
    shared = {"model_name_or_path": model, "dataset_dir": str(write_data(bench.scratch / "data")),
              "finetuning_type": "lora", "per_device_train_batch_size": 4, "learning_rate": 1e-2,
              "max_steps": 6, "logging_steps": 1, "save_steps": 3, "seed": 0, "bf16": True,
              "plot_loss": False, "overwrite_output_dir": True}
    results = []
    for name, keys in runs(bench.scratch).items():
        keys = dict(keys)
        out = bench.scratch / folder_name(keys.pop("output_dir", name))
        config = shared | keys | {"output_dir": str(out)}
        if "resume_from_checkpoint" in config:
            config.pop("overwrite_output_dir")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            code = main(["train", str(write_yaml(bench.scratch / f"{folder_name(name)}.yaml", config))])
            ended = json.loads((out / "all_results.json").read_text())
            error = None if code == 0 else f"exit {code}"
        except Exception:  # the check goes on to the next run and reports this one failed
            traceback.print_exc()
            ended, error = {}, traceback.format_exc().splitlines()[-1]
        results.append({"run": name, "ok": error is None, "error": error,
                        "train_loss": ended.get("train_loss"), "seconds": round(time.perf_counter() - start, 1),
                        "max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None})
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "runs": results}


def render(data: dict) -> str:
    rows = [[r["run"], "ok" if r["ok"] else f"FAILED: {r['error']}",
             f"{r['train_loss']:.3f}" if r["train_loss"] is not None else "n/a",
             f"{r['max_allocated_mib']:,}" if r["max_allocated_mib"] is not None else "n/a"]
            for r in data["runs"]]
    passed = sum(r["ok"] for r in data["runs"])
    return (f"{data['device']}, bf16: {passed} of {len(data['runs'])} runs ended well.\n\n"
            + table(["run", "result", "train loss", "max allocated MiB"], "llrr", rows)
            + "\n\n" + source_line("gpu_stages") + "\n")


def main() -> None:
    bench = gpu_bench("gpu_stages", __doc__)
    if not bench.args.render_only:
        bench.write_json(measure(bench))
    data = bench.read_json()
    bench.rewrite("BENCHMARKS.md", "gpu_stages", render(data))
    if not all(r["ok"] for r in data["runs"]):
        sys.exit("some runs failed: see above.")


if __name__ == "__main__":
    main()
