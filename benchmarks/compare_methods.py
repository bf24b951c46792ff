"""The method table: `lmtune compare examples/compare_methods.yaml` run as a user runs it, timed
whole from outside, its compare.{md,json,png} kept as benchmarks/results/compare_methods.*, and a
summary beside them with what the table quotes: per variant the numbers of compare.json (a swept
variant's at its best rate, with every rate it tried), its speed and memory against LoRA, its
benchmark accuracy against the base model's, and the whole run's wall time next to the sum of the
trainings' own (which leaves out starting each process, validating every variant, answering the
val questions, the benchmark and the parent's bookkeeping).

    python benchmarks/compare_methods.py              # about 25 minutes on 2 CPU cores
    python benchmarks/compare_methods.py --summarise  # no run: the summary of the compare_methods.json there is
"""

from __future__ import annotations

from _harness import Bench, run_compare, source_line, table

SPEC = "examples/compare_methods.yaml"
LABELS = {  # a swept variant's label gets its best rate from the results
    "full": "full (lr 5e-5)", "freeze": "freeze (last 2 layers, lr 2e-4)", "lora": "lora (r 8, all linear, lr 5e-4)",
    "dora": "dora", "qlora": "qlora (nf4 base)", "prefix": "prefix (16 tokens)",
    "prompt": "prompt (16 tokens, text init, lr 3e-2)", "ia3": "ia3",
}


def _sweep(v: dict) -> dict | None:
    """A swept variant's points as the summary keeps them."""
    if not v.get("sweep"):
        return None
    points = [{"label": p["label"], "values": p["values"], "status": p["status"]}
              | ({"score_hits": p["score"]["hits"], "score_total": p["score"]["total"],
                  "eval_loss": p["eval_loss"], "wall_s": p["wall_s"],
                  "benchmark_accuracy": (p.get("benchmark") or {}).get("accuracy")}
                 if p["status"] == "ok" else {}) for p in v["sweep"]["points"]]
    return {"keys": v["sweep"]["keys"], "best": v["sweep"]["best"], "points": points}


def summarise(compare: dict, whole_run_wall_s: float | None) -> dict:
    lora = next(v for v in compare["variants"] if v["name"] == "lora")
    variants = [{"name": v["name"], "trainable_params": v["trainable_params"], "trainable_pct": v["trainable_pct"],
                 "peak_rss_gib": v["peak_rss_gib"], "wall_s": v["wall_s"],
                 "train_tokens_per_second": v["train_tokens_per_second"],
                 "speed_vs_lora": round(v["train_tokens_per_second"] / lora["train_tokens_per_second"], 2),
                 "memory_vs_lora": round(v["peak_rss_gib"] / lora["peak_rss_gib"], 2),
                 "final_train_loss": v["final_train_loss"], "eval_loss": v["eval_loss"], "steps": v["steps"],
                 "score_hits": v["score"]["hits"], "score_total": v["score"]["total"], "size_mb": v["size_mb"],
                 "benchmark_accuracy": (v.get("benchmark") or {}).get("accuracy"),
                 "benchmark_delta": (v.get("benchmark") or {}).get("delta"), "sweep": _sweep(v)}
                for v in compare["variants"]]
    trainings = [p["wall_s"] for v in variants for p in (v["sweep"] or {}).get("points", []) if "wall_s" in p]
    trainings += [v["wall_s"] for v in variants if not v["sweep"]]
    total = round(sum(trainings), 1)
    task = compare["spec"].get("eval_task")
    base = next(iter(compare.get("base_models", {}).values()), None)
    return {"whole_run_wall_s": whole_run_wall_s, "trainings": len(trainings), "variants_wall_s_sum": total,
            "variants_wall_min_sum": round(total / 60, 1),
            "benchmark": {"task": task, "n_shot": compare["spec"]["n_shot"], "questions": base["questions"],
                          "base_accuracy": base["accuracy"]} if task and base and "accuracy" in base else None,
            "variants": variants}


def size(mb: float) -> str:
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.3g}"


def _label(v: dict) -> str:
    label = LABELS.get(v["name"], v["name"])
    sweep = v.get("sweep")
    if not sweep or not sweep["best"]:
        return label
    best = next(p for p in sweep["points"] if p["label"] == sweep["best"])
    chosen = ", ".join(f"{'lr' if k == 'learning_rate' else k} {x:g}" if isinstance(x, float) else f"{k} {x}"
                       for k, x in best["values"].items())
    return f"{label[:-1]}, {chosen})" if label.endswith(")") else f"{label} ({chosen})"


def _sweep_table(rows: list[dict], bench: bool) -> str:
    body = []
    for v in rows:
        for p in (v.get("sweep") or {}).get("points", []):
            cells = ([f"{p['score_hits']}/{p['score_total']}", f"{p['eval_loss']:.3f}"]
                     + ([f"{p['benchmark_accuracy']:.1f}"] if bench else [])
                     if p["status"] == "ok" else ["failed", "-"] + (["-"] if bench else []))
            body.append([v["name"], p["label"] + (" (best)" if p["label"] == v["sweep"]["best"] else ""), *cells])
    if not body:
        return ""
    return ("\n\nEach swept variant trained once per rate; the table above shows its best, by identity score, "
            "then eval loss:\n\n"
            + table(["variant", "rate", "identity score", "eval loss"] + (["benchmark %"] if bench else []),
                    "llrr" + ("r" if bench else ""), body)
            + "\n\n" + source_line("compare_methods_summary"))


def render(summary: dict) -> str:
    rows = summary["variants"]
    bench = summary.get("benchmark")
    trainings = f"{summary['trainings']} trainings'" if "trainings" in summary else "variants'"
    if summary["whole_run_wall_s"] is None:
        timing = (f"The {trainings} own wall times sum to {summary['variants_wall_s_sum']:.0f} s "
                  f"({summary['variants_wall_min_sum']:.1f} minutes); the whole run's time was not recorded for this file.")
    else:
        timing = (f"The whole run took {summary['whole_run_wall_s']:.0f} s; the {trainings} own wall "
                  f"times sum to {summary['variants_wall_s_sum']:.0f} s "
                  f"({summary['variants_wall_min_sum']:.1f} minutes).")
    if bench:
        timing += (f" Benchmark: {bench['task']} ({bench['questions']} questions, {bench['n_shot']}-shot); the base "
                   f"model scores {bench['base_accuracy']:.1f}%, and each variant's change against it is in brackets.")
    body = [[_label(v), f"{v['trainable_params']:,}", f"{v['trainable_pct']:.2f}",
             f"{v['peak_rss_gib']:.2f}", f"{v['memory_vs_lora']:.2f}", f"{v['wall_s']:.1f}",
             f"{v['train_tokens_per_second']:.1f}", f"{v['speed_vs_lora']:.2f}", f"{v['final_train_loss']:.3f}",
             f"{v['eval_loss']:.3f}", f"{v['score_hits']}/{v['score_total']}"]
            + ([f"{v['benchmark_accuracy']:.1f} ({v['benchmark_delta']:+.1f})"] if bench else []) + [size(v["size_mb"])]
            for v in rows]
    return (f"Each variant trains {rows[0]['steps']} steps. {timing}\n\n"
            + table(["variant", "trainable params", "%", "peak RSS GiB", "x lora memory", "wall s", "train tokens/s",
                     "x lora speed", "final train loss", "eval loss", "identity score"]
                    + (["benchmark % (vs base)"] if bench else []) + ["size MB"],
                    "lrrrrrrrrrr" + ("r" if bench else "") + "r", body)
            + "\n\n" + source_line("compare_methods_summary") + _sweep_table(rows, bool(bench)) + "\n")


def main() -> None:
    bench = Bench("compare_methods", __doc__, lambda p: p.add_argument(
        "--summarise", action="store_true", help="run nothing: summarise the compare_methods.json there is"))
    if not bench.args.render_only:
        whole = None if bench.args.summarise else run_compare(
            bench, SPEC, {"score_max_new_tokens": 8, "n_shot": 1})
        bench.write_json(summarise(bench.read_json(), whole), "compare_methods_summary")
    bench.rewrite("BENCHMARKS.md", "compare_methods", render(bench.read_json("compare_methods_summary")))


if __name__ == "__main__":
    main()
