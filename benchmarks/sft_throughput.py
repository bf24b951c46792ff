"""SFT training throughput and peak memory of lmtune's loop, against baselines in the same run.

Each variant trains the quickstart config (default model, LoRA on all linear layers, batch 8, bf16)
for a fixed number of steps in its own child process, one after another (two torch processes on
two cores slow each other several-fold), and reports train tokens/s from all_results.json and the
child's peak RSS. Ratios are against `full-logits`, the usual path: the output head computes logits
at every position and the loss masks them afterwards.

    python benchmarks/sft_throughput.py            # prints a table, writes benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "full-logits": "baseline: logits at every position, masked cross-entropy",
    "lmtune": "output head only where a label trains (lmtune's default)",
    "lmtune+checkpointing": "lmtune with gradient_checkpointing: true",
}


def full_logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100, reduction="sum"), {}


def run_variant(variant: str, output_dir: str, steps: int) -> None:
    """Child process: one training run of `steps` steps."""
    from lmtune.cli import main
    from lmtune.train import sft

    if variant == "full-logits":
        sft.SFT_OBJECTIVE.loss = full_logits_loss
    overrides = [f"output_dir={output_dir}", f"max_steps={steps}", "logging_steps=1000",
                 "plot_loss=false", "save_steps=100000"]
    if variant == "lmtune+checkpointing":
        overrides.append("gradient_checkpointing=true")
    code = main(["train", str(ROOT / "examples" / "quickstart.yaml"), *overrides])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (Path(output_dir) / "peak_rss_kib.json").write_text(json.dumps(peak_kib))
    sys.exit(code)


def measure(steps: int) -> list[dict]:
    rows = []
    for variant, meaning in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            subprocess.run([sys.executable, __file__, "--child", variant, "--out", str(out),
                            "--steps", str(steps)], check=True, cwd=ROOT, capture_output=True)
            peak_kib = json.loads((out / "peak_rss_kib.json").read_text())
            results = json.loads((out / "all_results.json").read_text())
        rows.append({"variant": variant, "meaning": meaning, "steps": steps,
                     "tokens_per_second": results["train_tokens_per_second"],
                     "peak_rss_gib": round(peak_kib / 2**20, 3),
                     "train_loss": round(results["train_loss"], 4)})
    base = rows[0]
    for row in rows:
        row["speed_vs_baseline"] = round(row["tokens_per_second"] / base["tokens_per_second"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        run_variant(args.child, args.out, args.steps)
        return
    rows = measure(args.steps)
    print(f"{'variant':<22}{'tokens/s':>10}{'x baseline':>12}{'peak RSS GiB':>14}{'loss':>8}")
    for r in rows:
        print(f"{r['variant']:<22}{r['tokens_per_second']:>10.1f}{r['speed_vs_baseline']:>12.2f}"
              f"{r['peak_rss_gib']:>14.2f}{r['train_loss']:>8.3f}")
    out = ROOT / "benchmarks" / "results" / "sft_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
