"""SFT training throughput and peak memory of lmtune's loop, against baselines in the same run.

Each variant trains the quickstart config (default model, LoRA on all linear layers, batch 8, bf16)
for a fixed number of steps in its own child process, one after another, and reports train tokens/s
from all_results.json and the child's peak RSS. Ratios are against `full-logits`, the usual path:
the output head computes logits at every position and the loss masks them afterwards.

    python benchmarks/sft_throughput.py     # writes benchmarks/results/sft_throughput.json and its
                                            # table in BENCHMARKS.md
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch.nn.functional as F

from _harness import ROOT, Bench, run_child, source_line, table

VARIANTS = {
    "full-logits": ("full-logits (baseline: output head at every position, masked CE)", []),
    "lmtune": ("lmtune (output head only where a label trains)", []),
    "lmtune+checkpointing": ("lmtune + gradient_checkpointing", ["gradient_checkpointing=true"]),
    "lmtune fp32": ("lmtune in fp32 (no bf16 autocast)", ["bf16=false"]),
    "lmtune batch 1x8": ("lmtune, batch 1 x accumulation 8",
                         ["per_device_train_batch_size=1", "gradient_accumulation_steps=8"]),
}


def full_logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100, reduction="sum"), {}


def child(variant: str, overrides: list[str]) -> None:
    """In the child process: one training run."""
    from lmtune.cli import main
    from lmtune.train import sft

    if variant == "full-logits":
        objective = sft.token_objective
        sft.token_objective = lambda cfg: replace(objective(cfg), loss=full_logits_loss)
    sys.exit(main(["train", str(ROOT / "examples" / "quickstart.yaml"), *overrides, *VARIANTS[variant][1]]))


def measure(bench: Bench, steps: int) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        out = bench.scratch / variant.replace(" ", "-")
        overrides = [f"output_dir={out}", f"max_steps={steps}", "logging_steps=1000", "plot_loss=false",
                     "save_steps=100000", "overwrite_output_dir=true", *bench.model_overrides()]
        run = run_child([sys.executable, __file__, "--child", variant, *overrides], out.with_suffix(".log"))
        results = json.loads((out / "all_results.json").read_text())
        rows.append({"variant": variant, "steps": steps,
                     "tokens_per_second": results["train_tokens_per_second"],
                     "peak_rss_gib": run.peak_rss_gib,
                     # the mean over the run's steps, not the last step's loss
                     "mean_train_loss": round(results["train_loss"], 4)})
    base = rows[0]
    for row in rows:
        row["speed_vs_baseline"] = round(row["tokens_per_second"] / base["tokens_per_second"], 3)
    return rows


def render(rows: list[dict]) -> str:
    steps = rows[0]["steps"]
    body = [[VARIANTS[r["variant"]][0], f"{r['tokens_per_second']:.1f}", f"{r['speed_vs_baseline']:.2f}",
             f"{r['peak_rss_gib']:.2f}", f"{r['mean_train_loss']:.3f}"] for r in rows]
    return table(["variant", "tokens/s", "x baseline", "peak RSS GiB", f"mean train loss over {steps} steps"],
                 "lrrrr", body) + "\n\n" + source_line("sft_throughput") + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    bench = Bench("sft_throughput", __doc__, settings={"steps": ("optimizer steps per variant", 20, 2)})
    if not bench.args.render_only:
        steps = bench.settings["steps"]
        bench.write_json(measure(bench, steps))
    bench.rewrite("BENCHMARKS.md", "sft_throughput", render(bench.read_json()))


if __name__ == "__main__":
    main()
