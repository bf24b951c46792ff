"""SFT training speed with packing, against the same run unpacked (the baseline), in the same session.

Each variant trains the quickstart config (default model, LoRA on all linear layers, bf16, identity +
replay data, cutoff 512) for one epoch in its own child process, one after another (two torch
processes on two cores slow each other several-fold), and reports train tokens/s (non-padding
tokens) and wall time from all_results.json, the optimizer steps, and the child's peak RSS.
Unpacked rows are padded to the longest row of their micro-batch; packed rows hold several samples
each, up to 512 tokens, so fewer tokens are padding.

    python benchmarks/packing_throughput.py       # prints a table, writes benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "unpacked": ("baseline: batch 8, rows padded to the longest in the batch",
                 ["per_device_train_batch_size=8"]),
    "packed": ("packing: true, batch 2 (about 14 samples per micro-batch)",
               ["packing=true", "per_device_train_batch_size=2"]),
}


def run_variant(variant: str, output_dir: str) -> None:
    """Child process: one epoch."""
    from lmtune.cli import main

    overrides = [f"output_dir={output_dir}", "num_train_epochs=1", "logging_steps=1000",
                 "plot_loss=false", "save_steps=100000", *VARIANTS[variant][1]]
    code = main(["train", str(ROOT / "examples" / "quickstart.yaml"), *overrides])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (Path(output_dir) / "peak_rss_kib.json").write_text(json.dumps(peak_kib))
    sys.exit(code)


def measure(repeats: int) -> list[dict]:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # alternate the variants so drift in the machine's load hits both
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                subprocess.run([sys.executable, __file__, "--child", variant, "--out", str(out)],
                               check=True, cwd=ROOT, capture_output=True)
                results = json.loads((out / "all_results.json").read_text())
                results["peak_kib"] = json.loads((out / "peak_rss_kib.json").read_text())
                runs[variant].append(results)
    rows = []
    for variant, results in runs.items():
        rows.append({"variant": variant, "meaning": VARIANTS[variant][0], "repeats": repeats,
                     "tokens_per_second": statistics.median(r["train_tokens_per_second"] for r in results),
                     "train_seconds": statistics.median(r["train_runtime"] for r in results),
                     "steps": results[0]["global_step"], "train_rows": results[0]["train_rows"],
                     "peak_rss_gib": round(max(r["peak_kib"] for r in results) / 2**20, 2),
                     "train_loss": round(statistics.median(r["train_loss"] for r in results), 4)})
    base = rows[0]
    for row in rows:
        row["speed_vs_baseline"] = round(row["tokens_per_second"] / base["tokens_per_second"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        run_variant(args.child, args.out)
        return
    rows = measure(args.repeats)
    print(f"{'variant':<10}{'rows':>6}{'steps':>7}{'tokens/s':>10}{'x baseline':>12}{'seconds':>9}"
          f"{'peak RSS GiB':>14}{'loss':>8}")
    for r in rows:
        print(f"{r['variant']:<10}{r['train_rows']:>6}{r['steps']:>7}{r['tokens_per_second']:>10.1f}"
              f"{r['speed_vs_baseline']:>12.2f}{r['train_seconds']:>9.1f}{r['peak_rss_gib']:>14.2f}"
              f"{r['train_loss']:>8.3f}")
    out = ROOT / "benchmarks" / "results" / "packing_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
