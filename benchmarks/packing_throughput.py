"""SFT training speed with packing, against the same run unpacked (the baseline), in the same session.

Each variant trains the quickstart config (default model, LoRA on all linear layers, bf16, identity +
replay data, cutoff 512) for one epoch in its own child process, the variants alternated, and
reports train tokens/s (non-padding tokens) and training seconds from all_results.json, the
optimizer steps, and the child's peak RSS; beside them what `lmtune plan` predicted for the same
config (steps and peak memory), so the plan's estimate is checked against a measurement.
Unpacked rows are padded to the longest row of their micro-batch; packed rows hold several samples
each, up to 512 tokens, so fewer tokens are padding. With gradient accumulation, lmtune regroups the
rows of each optimizer step by length across its micro-batches (`group_by_length`): the same rows
and the same summed loss per step, in batches of rows of like length; the two accumulated variants
measure that lever on and off.

    python benchmarks/packing_throughput.py   # writes benchmarks/results/packing_throughput.json
                                              # and its table in BENCHMARKS.md
"""

from __future__ import annotations

import json
import statistics

from _harness import Bench, lmtune, run_child, source_line, table

VARIANTS = {
    "unpacked": ("unpacked (baseline: batch 8, padded to the longest row of the batch)",
                 ["per_device_train_batch_size=8"]),
    "accumulated": ("unpacked, batch 2 x accumulation 4, micro-batches as drawn "
                    "(`group_by_length: false`)",
                    ["per_device_train_batch_size=2", "gradient_accumulation_steps=4",
                     "group_by_length=false"]),
    "grouped": ("unpacked, batch 2 x accumulation 4, each step's rows grouped by length "
                "(`group_by_length: true`, the default)",
                ["per_device_train_batch_size=2", "gradient_accumulation_steps=4"]),
    "packed": ("packed (`packing: true`, batch 2 rows of up to 512 tokens)",
               ["packing=true", "per_device_train_batch_size=2"]),
}


def measure(bench: Bench, repeats: int, extra: list[str]) -> list[dict]:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for repeat in range(repeats):  # alternate the variants so drift in the machine's load hits both
        for variant, (_, keys) in VARIANTS.items():
            out = bench.scratch / f"{variant}-{repeat}"
            run = run_child(lmtune("train", "examples/quickstart.yaml", f"output_dir={out}", "logging_steps=1000",
                                   "plot_loss=false", "save_steps=100000", "overwrite_output_dir=true",
                                   *keys, *extra), bench.scratch / f"{variant}-{repeat}.log")
            runs[variant].append(json.loads((out / "all_results.json").read_text()) | {"peak": run.peak_rss_gib})
    rows = []
    for variant, results in runs.items():
        keys = VARIANTS[variant][1]
        plan_run = run_child(lmtune("plan", "examples/quickstart.yaml", *keys, *extra, "--json"),
                             bench.scratch / f"{variant}-plan.json")
        plan = json.loads(plan_run.log.read_text())
        rows.append({"variant": variant, "repeats": repeats,
                     "tokens_per_second": statistics.median(r["train_tokens_per_second"] for r in results),
                     "train_seconds": statistics.median(r["train_runtime"] for r in results),
                     "steps": results[0]["global_step"], "train_rows": results[0]["train_rows"],
                     "train_tokens": results[0]["train_tokens"],
                     "peak_rss_gib": max(r["peak"] for r in results),
                     "mean_train_loss": round(statistics.median(r["train_loss"] for r in results), 4),
                     "plan_steps": plan["schedule"]["optimizer_steps"],
                     "plan_memory_gib": plan["model"]["memory_gib"]["total"]})
    base = rows[0]
    for row in rows:
        row["speed_vs_baseline"] = round(row["tokens_per_second"] / base["tokens_per_second"], 2)
        row["seconds_vs_baseline"] = round(row["train_seconds"] / base["train_seconds"], 2)
        # what the plan leaves out: the Python, torch and tokenizer runtime that RSS includes
        row["rss_over_plan_gib"] = round(row["peak_rss_gib"] - row["plan_memory_gib"], 2)
    return rows


def render(rows: list[dict]) -> str:
    body = [[VARIANTS[r["variant"]][0], f"{r['train_rows']:,}", str(r["steps"]), str(r["plan_steps"]),
             f"{r['tokens_per_second']:.1f}", f"{r['speed_vs_baseline']:.2f}", f"{r['train_seconds']:.1f}",
             f"{r['peak_rss_gib']:.2f}", f"{r['plan_memory_gib']:.2f}", f"{r['rss_over_plan_gib']:.2f}"]
            for r in rows]
    return table(["variant", "rows", "steps", "`lmtune plan` steps", "tokens/s", "x baseline", "seconds",
                  "peak RSS GiB", "`lmtune plan` estimate GiB", "RSS - estimate GiB"], "lrrrrrrrrr", body) + \
        "\n\n" + source_line("packing_throughput") + "\n"


def main() -> None:
    bench = Bench("packing_throughput", __doc__,
                  lambda p: p.add_argument("--repeats", type=int, help="runs of each variant (2)"))
    if not bench.args.render_only:
        extra = bench.model_overrides() + (["max_steps=2"] if bench.smoke else ["num_train_epochs=1"])
        bench.write_json(measure(bench, bench.args.repeats or (1 if bench.smoke else 2), extra))
    bench.rewrite("BENCHMARKS.md", "packing_throughput", render(bench.read_json()))


if __name__ == "__main__":
    main()
