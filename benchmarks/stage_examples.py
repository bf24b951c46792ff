"""The stage examples on the default model: examples/{pt,rm,ppo,dpo,kto}.yaml run one after another
as a user runs them (ppo against the reward model rm just trained), each in its own process.

Per example: the whole run's wall time and peak RSS, the training loop's seconds and steps, the rows
it trained and held out, and its held-out effect: every example evaluates before its first update
and after its last, so each effect is a same-run comparison against the starting model
(`eval_<metric>_start` and `eval_<metric>` in all_results.json; for ppo the held-out pass logged as
step 0).

    python benchmarks/stage_examples.py   # writes benchmarks/results/stage_examples.json, its
                                          # table in BENCHMARKS.md and the stage lines of README.md
"""

from __future__ import annotations

import json
import os
import statistics

from _harness import Bench, lmtune, run_child, source_line, table

EXAMPLES = ("pt", "rm", "ppo", "dpo", "kto")
# (label, key in all_results.json without eval_ / _start, shown as a percentage)
EFFECTS = {
    "pt": [("perplexity", "perplexity", False)],
    "rm": [("pair accuracy", "accuracy", True), ("mean margin", "margin", False)],
    "ppo": [("greedy reward", "reward", False), ("answer length in tokens", "response_length", False)],
    "dpo": [("reward accuracy", "reward_accuracy", True), ("margin", "reward_margin", False)],
    "kto": [("implicit reward of desirable answers", "reward_desirable", False),
            ("of undesirable answers", "reward_undesirable", False)],
}
COMMENTS = {"pt": "", "rm": "", "ppo": " (against saves/rm)", "dpo": " (sigmoid, beta 0.1)", "kto": " (beta 0.1)"}


def run_example(bench: Bench, name: str, extra: list[str]) -> dict:
    out = bench.scratch / name
    run = run_child(lmtune("train", f"examples/{name}.yaml", f"output_dir={out}", *extra,
                           *bench.model_overrides(), *(["max_steps=1", "max_new_tokens=8"] if bench.smoke else [])),
                    bench.scratch / f"{name}.log")
    results = json.loads((out / "all_results.json").read_text())
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    start = next(r for r in log if r["step"] == 0)  # the held-out pass before the first update
    effects = [{"metric": label, "percent": percent, "before": start[f"eval_{key}"], "after": results[f"eval_{key}"]}
               for label, key, percent in EFFECTS[name]]
    record = {"example": name, "wall_s": run.wall_s, "peak_rss_gib": run.peak_rss_gib,
              "train_seconds": results["train_runtime"], "steps": results["global_step"],
              "train_rows": results.get("train_rows", results.get("train_prompts")),
              "held_out_rows": results.get("val_rows", results.get("val_prompts")), "effects": effects}
    if name == "ppo":
        record["seconds_per_iteration"] = round(statistics.median(r["seconds"] for r in log if r["step"] > 0), 2)
        record["kl_per_answer"] = results["kl"]
    else:
        record["tokens_per_second"] = results["train_tokens_per_second"]
    return record


def measure(bench: Bench) -> dict:
    records = []
    for name in EXAMPLES:
        extra = [f"reward_model={bench.scratch / 'rm'}"] if name == "ppo" else []
        records.append(run_example(bench, name, extra))
    return {"cpus": os.cpu_count(), "examples": records}


def number(value: float, percent: bool) -> str:
    """Three significant digits, never in exponent notation (the provenance test reads plain numbers)."""
    if percent:
        return f"{100 * value:.1f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value == 0 or abs(value) >= 0.01 else f"{value:.4f}"


def effect(record: dict) -> str:
    parts = [f"{e['metric']} {number(e['before'], e['percent'])} -> {number(e['after'], e['percent'])}"
             for e in record["effects"]]
    if "kl_per_answer" in record:
        parts.append(f"KL paid {record['kl_per_answer']:.2f} per answer")
    return "; ".join(parts)


def render_table(data: dict) -> str:
    body = []
    for r in data["examples"]:
        speed = (f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r
                 else f"({r['seconds_per_iteration']:.1f} s per iteration)")
        body.append([f"{r['example']}{COMMENTS[r['example']]}", f"{r['train_rows']} / {r['held_out_rows']}",
                     str(r["steps"]), f"{r['train_seconds']:.0f}", f"{r['wall_s']:.0f}", f"{r['peak_rss_gib']:.2f}",
                     speed, effect(r)])
    return (table(["example", "rows (train / held out)", "steps", "training s", "whole run s", "peak RSS GiB",
                   "tokens/s", "held-out effect, before -> after"], "llrrrrrl", body)
            + "\n\n" + source_line("stage_examples") + "\n")


def render_readme(data: dict) -> str:
    lines = [f"lmtune train examples/{r['example']}.yaml   # "
             f"{'against saves/rm: ' if r['example'] == 'ppo' else ''}{effect(r)} ({r['wall_s']:.0f} s)"
             for r in data["examples"]]
    return ("```\n" + "\n".join(lines) + "\n```\n\n"
            f"Times are whole runs on {data['cpus']} CPU cores. " + source_line("stage_examples") + "\n")


def main() -> None:
    bench = Bench("stage_examples", __doc__)
    if not bench.args.render_only:
        bench.write_json(measure(bench))
    data = bench.read_json()
    bench.rewrite("BENCHMARKS.md", "stage_examples", render_table(data))
    bench.rewrite("README.md", "stage_examples", render_readme(data))


if __name__ == "__main__":
    main()
