"""The method table: `lmtune compare examples/compare_methods.yaml` run as a user runs it, timed
whole from outside, its compare.{md,json,png} kept as benchmarks/results/compare_methods.*, and a
summary beside them with what the table quotes: per variant the numbers of compare.json and its
speed and memory against LoRA, and the whole run's wall time next to the sum of the variants' own
(which leaves out starting the command, validating every variant and the parent's bookkeeping).

    python benchmarks/compare_methods.py              # about 15 minutes on 2 CPU cores
    python benchmarks/compare_methods.py --summarise  # no run: the summary of the compare_methods.json there is
"""

from __future__ import annotations

import shutil

import yaml

from _harness import ROOT, Bench, lmtune, run_child, source_line, table

SPEC = "examples/compare_methods.yaml"
LABELS = {
    "full": "full (lr 5e-5)", "freeze": "freeze (last 2 layers, lr 2e-4)", "lora": "lora (r 8, all linear, lr 5e-4)",
    "dora": "dora", "qlora": "qlora (nf4 base)", "prefix": "prefix (16 tokens, lr 1e-2)",
    "prompt": "prompt (16 tokens, text init, lr 3e-2)", "ia3": "ia3 (lr 5e-3)",
}


def run(bench: Bench) -> float:
    """Run the comparison; copy its report into the results; its whole wall time."""
    spec = ROOT / SPEC
    if bench.smoke:  # the example's own output_dir stays untouched
        values = yaml.safe_load(spec.read_text()) | {"output_dir": str(bench.scratch / "compare"),
                                                      "score_max_new_tokens": 8}
        spec = bench.scratch / "compare_methods.yaml"
        spec.write_text(yaml.safe_dump(values))
    out = ROOT / yaml.safe_load(spec.read_text())["output_dir"]
    extra = [*bench.model_overrides(), "max_steps=1"] if bench.smoke else []
    whole = run_child(lmtune("compare", str(spec), *extra), bench.scratch / "compare.log")
    for suffix in ("md", "json", "png"):
        shutil.copy(out / f"compare.{suffix}", bench.results / f"compare_methods.{suffix}")
    return whole.wall_s


def summarise(compare: dict, whole_run_wall_s: float | None) -> dict:
    lora = next(v for v in compare["variants"] if v["name"] == "lora")
    variants = [{"name": v["name"], "trainable_params": v["trainable_params"], "trainable_pct": v["trainable_pct"],
                 "peak_rss_gib": v["peak_rss_gib"], "wall_s": v["wall_s"],
                 "train_tokens_per_second": v["train_tokens_per_second"],
                 "speed_vs_lora": round(v["train_tokens_per_second"] / lora["train_tokens_per_second"], 2),
                 "memory_vs_lora": round(v["peak_rss_gib"] / lora["peak_rss_gib"], 2),
                 "final_train_loss": v["final_train_loss"], "eval_loss": v["eval_loss"], "steps": v["steps"],
                 "score_hits": v["score"]["hits"], "score_total": v["score"]["total"], "size_mb": v["size_mb"]}
                for v in compare["variants"]]
    total = round(sum(v["wall_s"] for v in variants), 1)
    return {"whole_run_wall_s": whole_run_wall_s, "variants_wall_s_sum": total,
            "variants_wall_min_sum": round(total / 60, 1), "variants": variants}


def size(mb: float) -> str:
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.3g}"


def render(summary: dict) -> str:
    rows = summary["variants"]
    if summary["whole_run_wall_s"] is None:
        timing = (f"The variants' own wall times sum to {summary['variants_wall_s_sum']:.0f} s "
                  f"({summary['variants_wall_min_sum']:.1f} minutes); the whole run's time was not recorded for this file.")
    else:
        timing = (f"The whole run took {summary['whole_run_wall_s']:.0f} s; the variants' own wall times sum "
                  f"to {summary['variants_wall_s_sum']:.0f} s ({summary['variants_wall_min_sum']:.1f} minutes).")
    body = [[LABELS.get(v["name"], v["name"]), f"{v['trainable_params']:,}", f"{v['trainable_pct']:.2f}",
             f"{v['peak_rss_gib']:.2f}", f"{v['memory_vs_lora']:.2f}", f"{v['wall_s']:.1f}",
             f"{v['train_tokens_per_second']:.1f}", f"{v['speed_vs_lora']:.2f}", f"{v['final_train_loss']:.3f}",
             f"{v['eval_loss']:.3f}", f"{v['score_hits']}/{v['score_total']}", size(v["size_mb"])] for v in rows]
    return (f"Each variant trains {rows[0]['steps']} steps. {timing}\n\n"
            + table(["variant", "trainable params", "%", "peak RSS GiB", "x lora memory", "wall s", "train tokens/s",
                     "x lora speed", "final train loss", "eval loss", "identity score", "size MB"],
                    "lrrrrrrrrrrr", body) + "\n\n" + source_line("compare_methods_summary") + "\n")


def main() -> None:
    bench = Bench("compare_methods", __doc__, lambda p: p.add_argument(
        "--summarise", action="store_true", help="run nothing: summarise the compare_methods.json there is"))
    if not bench.args.render_only:
        whole = None if bench.args.summarise else run(bench)
        bench.write_json(summarise(bench.read_json(), whole), "compare_methods_summary")
    bench.rewrite("BENCHMARKS.md", "compare_methods", render(bench.read_json("compare_methods_summary")))


if __name__ == "__main__":
    main()
