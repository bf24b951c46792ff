"""The optimizer table: `lmtune compare examples/compare_optimizers.yaml` run as a user runs it
(full fine-tuning of the quickstart job under each optimizer, precision and token-loss rule, OFT and
QOFT beside them), timed whole from outside, its compare.{md,json,png} kept as
benchmarks/results/compare_optimizers.*, and a summary beside them: per variant its speed and peak
memory against plain AdamW measured in the same run, its losses and its identity score.

    python benchmarks/compare_optimizers.py              # about 80 minutes on 2 CPU cores
    python benchmarks/compare_optimizers.py --summarise  # no run: the summary of the compare_optimizers.json there is
"""

from __future__ import annotations

from _harness import Bench, run_compare, source_line, table

SPEC = "examples/compare_optimizers.yaml"
BASELINE = "adamw"


def _setting(key: str, value) -> str:
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def summarise(compare: dict, whole_run_wall_s: float | None) -> dict:
    base = next(v for v in compare["variants"] if v["name"] == BASELINE)
    variants = []
    for v in compare["variants"]:
        row = {"name": v["name"], "keys": v["keys"], "status": v["status"]}
        if v["status"] == "ok":
            row |= {"peak_rss_gib": v["peak_rss_gib"], "wall_s": v["wall_s"], "steps": v["steps"],
                    "train_tokens_per_second": v["train_tokens_per_second"],
                    "speed_vs_adamw": round(v["train_tokens_per_second"] / base["train_tokens_per_second"], 2),
                    "memory_vs_adamw": round(v["peak_rss_gib"] / base["peak_rss_gib"], 2),
                    "final_train_loss": v["final_train_loss"], "eval_loss": v["eval_loss"],
                    "score_hits": v["score"]["hits"], "score_total": v["score"]["total"]}
        variants.append(row)
    walls = [v["wall_s"] for v in variants if "wall_s" in v]
    return {"whole_run_wall_s": whole_run_wall_s, "variants_wall_s_sum": round(sum(walls), 1),
            "steps": base["steps"], "device": base["device"], "variants": variants}


def render(summary: dict) -> str:
    timing = f"the variants' own wall times sum to {summary['variants_wall_s_sum']:.0f} s"
    if summary["whole_run_wall_s"] is not None:
        timing = f"the whole run took {summary['whole_run_wall_s']:.0f} s; " + timing
    body = []
    for v in summary["variants"]:
        settings = ", ".join(_setting(k, x) for k, x in v["keys"].items() if k != "finetuning_type")
        if v["status"] != "ok":
            body.append([v["name"], settings] + ["failed"] + ["-"] * 7)
            continue
        body.append([v["name"], settings, f"{v['peak_rss_gib']:.2f}", f"{v['memory_vs_adamw']:.2f}",
                     f"{v['wall_s']:.1f}", f"{v['train_tokens_per_second']:.1f}", f"{v['speed_vs_adamw']:.2f}",
                     f"{v['final_train_loss']:.3f}", f"{v['eval_loss']:.3f}",
                     f"{v['score_hits']}/{v['score_total']}"])
    return (f"Each variant trains {summary['steps']} steps on {summary['device']}; {timing}.\n\n"
            + table(["variant", "keys", "peak RSS GiB", "x adamw memory", "wall s", "train tokens/s",
                     "x adamw speed", "final train loss", "eval loss", "identity score"],
                    "llrrrrrrrr", body)
            + "\n\n" + source_line("compare_optimizers_summary") + "\n")


def main() -> None:
    bench = Bench("compare_optimizers", __doc__, lambda p: p.add_argument(
        "--summarise", action="store_true", help="run nothing: summarise the compare_optimizers.json there is"))
    if not bench.args.render_only:
        whole = None if bench.args.summarise else run_compare(bench, SPEC, {"score_max_new_tokens": 8})
        bench.write_json(summarise(bench.read_json(), whole), "compare_optimizers_summary")
    bench.rewrite("BENCHMARKS.md", "compare_optimizers", render(bench.read_json("compare_optimizers_summary")))


if __name__ == "__main__":
    main()
