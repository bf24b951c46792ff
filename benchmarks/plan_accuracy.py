"""How close `lmtune plan`'s memory estimate comes to the peak RSS a run then has (issue #13 asks
within 25% on CPU for LoRA, full, freeze and QLoRA at two cutoffs).

Continued pre-training (stage pt) on the Veloria corpus, packed, so every row is exactly cutoff_len
tokens and the estimate's worst micro-batch is the one the run meets; batch 2, fp32, the default
model. Each method and cutoff: `lmtune plan --json` for the config, then `lmtune train` for a few
steps in its own process, one after another; the table gives the estimate, the measured peak and
their ratio.

    python benchmarks/plan_accuracy.py     # writes benchmarks/results/plan_accuracy.json and its
                                           # table in BENCHMARKS.md
"""

from __future__ import annotations

import json
import subprocess

from _harness import ROOT, Bench, lmtune, run_child, source_line, table

METHODS = {
    "lora": ["finetuning_type=lora", "lora_target=all", "lora_rank=8"],
    "full": ["finetuning_type=full"],
    "freeze": ["finetuning_type=freeze", "freeze_trainable_layers=2"],
    "qlora": ["finetuning_type=lora", "lora_target=all", "lora_rank=8", "quantization_bit=4"],
}


def base_args(bench: Bench, cutoff: int, steps: int, out) -> list[str]:
    return ["model_name_or_path=" + bench.model, "stage=pt", "dataset=veloria_corpus",
            f"dataset_dir={ROOT / 'data'}", f"cutoff_len={cutoff}", "packing=true",
            "per_device_train_batch_size=2", "gradient_accumulation_steps=1", "bf16=false",
            f"max_steps={steps}", "learning_rate=1.0e-5", f"output_dir={out}",
            "overwrite_output_dir=true", "logging_steps=1000", "save_steps=100000",
            "plot_loss=false", "val_size=0"]


TOLERANCE = 0.25


def measure(bench: Bench) -> dict:
    steps = bench.settings["steps"]
    cutoffs = [64, 128] if bench.smoke else [256, 1024]
    config = bench.scratch / "plan_accuracy.yaml"
    config.write_text("stage: pt\n")  # every key comes from the command line below
    rows = []
    for cutoff in cutoffs:
        for method, keys in METHODS.items():
            out = bench.scratch / f"{method}-{cutoff}"
            args = [*base_args(bench, cutoff, steps, out), *keys]
            plan = subprocess.run(lmtune("plan", str(config), *args, "--json"), check=True,
                                  capture_output=True, text=True, cwd=ROOT).stdout
            estimate = json.loads(plan)["model"]["memory_gib"]
            run = run_child(lmtune("train", str(config), *args), out.with_suffix(".log"))
            rows.append({"method": method, "cutoff_len": cutoff, "steps": steps,
                         "plan_estimate_gib": estimate["total"], "peak_rss_gib": run.peak_rss_gib,
                         "estimate_over_measured": round(estimate["total"] / run.peak_rss_gib, 2),
                         "estimate_parts_gib": estimate})
            print(f"{method} cutoff {cutoff}: plan {estimate['total']:.2f} GiB, measured "
                  f"{run.peak_rss_gib:.2f} GiB", flush=True)
    within = sum(1 for r in rows if abs(r["estimate_over_measured"] - 1) <= TOLERANCE)
    return {"tolerance": TOLERANCE, "within_tolerance": within, "runs": len(rows), "rows": rows}


def render(data: dict) -> str:
    body = [[f"{r['method']}, cutoff {r['cutoff_len']:,}", f"{r['plan_estimate_gib']:.2f}",
             f"{r['peak_rss_gib']:.2f}", f"{r['estimate_over_measured']:.2f}"] for r in data["rows"]]
    return (f"{data['within_tolerance']} of {data['runs']} estimates within "
            f"{data['tolerance']:.0%} of the measured peak:\n\n"
            + table(["method, row length", "plan estimate GiB", "peak RSS GiB", "estimate / measured"],
                    "lrrr", body) + "\n\n" + source_line("plan_accuracy") + "\n")


def main() -> None:
    bench = Bench("plan_accuracy", __doc__, settings={"steps": ("optimizer steps per run", 3, 1)})
    if not bench.args.render_only:
        bench.write_json(measure(bench))
    bench.rewrite("BENCHMARKS.md", "plan_accuracy", render(bench.read_json()))


if __name__ == "__main__":
    main()
