"""Memory levers, torchtune-style: each lever's tokens/s and peak RSS against the run without it.

The quickstart config (default model, LoRA r=8 on all linear layers, batch 8, cutoff 512) trains the
same number of steps per row, each row in its own child process, one after another. Rows add one
lever each to the row above: fp32 everywhere on glibc's malloc, then mimalloc (lmtune's default
allocator), then the chunked output head and loss (`chunked_cross_entropy`, on by default), then
the frozen base stored in bf16 while computing in fp32 (`frozen_dtype: bfloat16`),
then bf16 autocast (the quickstart as shipped: autocast keeps the base in bf16), then gradient
checkpointing. The `runtime` row is a process that imports what `lmtune train` imports and loads the
default model's tokenizer, nothing more: the floor under every run, and `lmtune plan`'s
RUNTIME_GIB. Each training row also carries `lmtune plan`'s estimate of its peak for the same
config.

    python benchmarks/memory_levers.py     # writes benchmarks/results/memory_levers.json and its
                                           # table in BENCHMARKS.md
"""

from __future__ import annotations

import json
import subprocess
import sys

from _harness import ROOT, Bench, lmtune, run_child, source_line, table

QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")
# (name, what it adds, overrides): each row is the row above plus one lever.
LEVERS = [
    ("fp32", "fp32 weights and compute on glibc's malloc (no lever)",
     ["bf16=false", "frozen_dtype=float32", "allocator=system", "chunked_cross_entropy=false"]),
    ("+ mimalloc", "mimalloc as the process's allocator (lmtune's default)",
     ["bf16=false", "frozen_dtype=float32", "chunked_cross_entropy=false"]),
    ("+ chunked cross-entropy", "the output head and its loss a chunk of targets at a time (default)",
     ["bf16=false", "frozen_dtype=float32"]),
    ("+ bf16 frozen base, fp32 compute", "frozen base stored in bf16, cast up by each layer",
     ["bf16=false", "frozen_dtype=bfloat16"]),
    ("+ bf16 autocast", "matmuls in bf16 on the bf16 base (the quickstart as shipped)", ["bf16=true"]),
    ("+ gradient checkpointing", "recompute each layer's activations in backward",
     ["bf16=true", "gradient_checkpointing=true"]),
]


def runtime_child(model: str) -> None:
    """In the child process: the imports of a training run and the tokenizer, then exit. As
    `lmtune train` does for a run without quantization, bitsandbytes stays out."""
    from lmtune import measure
    from lmtune.config import build_config
    from lmtune.models.load import load_tokenizer, resolve_model
    from lmtune.runtime import leave_out_bitsandbytes

    leave_out_bitsandbytes(build_config({"model_name_or_path": model}))
    from lmtune.train import sft  # noqa: F401  (what `lmtune train` imports for the default stage)

    measure.report_peak_rss_at_exit()
    load_tokenizer(resolve_model(model))


def plan_total(bench: Bench, overrides: list[str]) -> float:
    out = bench.scratch / "plan.json"
    with open(out, "w") as handle:
        subprocess.run(lmtune("plan", QUICKSTART, *overrides, "--json"), stdout=handle, check=True,
                       cwd=ROOT)
    return json.loads(out.read_text())["model"]["memory_gib"]["total"]


def measure(bench: Bench, steps: int) -> list[dict]:
    runtime = run_child([sys.executable, __file__, "--runtime-child", bench.model],
                        bench.scratch / "runtime.log")
    rows = [{"lever": "runtime", "adds": "Python, torch, transformers, peft, the tokenizer",
             "peak_rss_gib": runtime.peak_rss_gib}]
    for name, adds, overrides in LEVERS:
        out = bench.scratch / f"run-{len(rows)}"
        args = [*overrides, f"output_dir={out}", f"max_steps={steps}", "logging_steps=1000",
                "plot_loss=false", "save_steps=100000", "overwrite_output_dir=true",
                *bench.model_overrides()]
        run = run_child(lmtune("train", QUICKSTART, *args), out.with_suffix(".log"))
        results = json.loads((out / "all_results.json").read_text())
        rows.append({"lever": name, "adds": adds, "steps": steps,
                     "tokens_per_second": results["train_tokens_per_second"],
                     "peak_rss_gib": run.peak_rss_gib, "wall_s": run.wall_s,
                     "mean_train_loss": round(results["train_loss"], 4),
                     "plan_estimate_gib": plan_total(bench, args)})
    for before, row in zip(rows[1:2] + rows[1:], rows[1:]):  # the first run against itself
        row["speed_vs_previous"] = round(row["tokens_per_second"] / before["tokens_per_second"], 3)
        row["memory_vs_previous"] = round(row["peak_rss_gib"] / before["peak_rss_gib"], 3)
    return rows


def render(rows: list[dict]) -> str:
    runtime, runs = rows[0], rows[1:]
    steps = runs[0]["steps"]
    body = [[f"{r['lever']}: {r['adds']}", f"{r['tokens_per_second']:.1f}",
             f"{r['speed_vs_previous']:.2f}", f"{r['peak_rss_gib']:.2f}",
             f"{r['memory_vs_previous']:.2f}", f"{r['plan_estimate_gib']:.2f}",
             f"{r['mean_train_loss']:.3f}"] for r in runs]
    return (f"The runtime alone (imports and tokenizer, no weights): "
            f"{runtime['peak_rss_gib']:.2f} GiB peak RSS.\n\n"
            + table(["lever (each row adds one to the row above)", "tokens/s", "x previous",
                     "peak RSS GiB", "x previous", "plan estimate GiB",
                     f"mean train loss over {steps} steps"], "lrrrrrr", body)
            + "\n\n" + source_line("memory_levers") + "\n")


def main() -> None:
    if sys.argv[1:2] == ["--runtime-child"]:
        runtime_child(sys.argv[2])
        return
    bench = Bench("memory_levers", __doc__, settings={"steps": ("optimizer steps per row", 20, 2)})
    if not bench.args.render_only:
        steps = bench.settings["steps"]
        bench.write_json(measure(bench, steps))
    bench.rewrite("BENCHMARKS.md", "memory_levers", render(bench.read_json()))


if __name__ == "__main__":
    main()
