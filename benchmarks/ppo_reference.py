"""PPO's reference model: the policy with its LoRA adapter switched off, against a second copy of
the model loaded as ref_model (what a PPO without adapter tricks keeps in memory).

Each variant runs examples/ppo.yaml for a few iterations in its own child process, one after the
other, with a verifiable reward defined here (so no reward model is loaded and the comparison is
the reference alone), and reports the child's peak RSS, seconds per iteration and the KL it logged.

    python benchmarks/ppo_reference.py   # writes benchmarks/results/ppo_reference.json and its
                                         # table in BENCHMARKS.md
"""

from __future__ import annotations

import json
import statistics
import sys

from _harness import ROOT, Bench, run_child, source_line, table

VARIANTS = {
    "ref_model copy": "baseline: the reference loaded as a second model (`ref_model: default`)",
    "adapter off": "lmtune: the policy with its adapter switched off",
}


def brevity(prompts: list[str], replies: list[str]) -> list[float]:
    """Shorter replies score higher: a reward any policy can move on."""
    return [-len(reply.split()) / 10 for reply in replies]


def child(overrides: list[str]) -> None:
    """In the child process, where this file's folder is on sys.path so the reward imports."""
    from lmtune.cli import main

    sys.exit(main(["train", str(ROOT / "examples" / "ppo.yaml"), *overrides]))


def measure(bench: Bench, iterations: int) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        out = bench.scratch / variant.replace(" ", "-")
        overrides = [f"output_dir={out}", f"max_steps={iterations}", "reward_model=ppo_reference:brevity",
                     "plot_loss=false", "save_steps=100000", "eval_dataset=null", "overwrite_output_dir=true",
                     *bench.model_overrides()]
        if variant == "ref_model copy":
            overrides.append(f"ref_model={bench.model}")
        run = run_child([sys.executable, __file__, "--child", *overrides], out.with_suffix(".log"))
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        steps = [r for r in log if r["step"] > 1] or log[-1:]  # the first iteration warms up
        rows.append({"variant": variant, "iterations": iterations,
                     "seconds_per_iteration": round(statistics.median(r["seconds"] for r in steps), 2),
                     "peak_rss_gib": run.peak_rss_gib,
                     "kl_per_iteration": [r["kl"] for r in log if r["step"] > 0]})
    base = rows[0]
    for row in rows:
        row["memory_vs_baseline"] = round(row["peak_rss_gib"] / base["peak_rss_gib"], 3)
        row["speed_vs_baseline"] = round(base["seconds_per_iteration"] / row["seconds_per_iteration"], 3)
    return rows


def render(rows: list[dict]) -> str:
    body = [[VARIANTS[r["variant"]], f"{r['seconds_per_iteration']:.2f}", f"{r['speed_vs_baseline']:.2f}",
             f"{r['peak_rss_gib']:.2f}", f"{r['memory_vs_baseline']:.2f}",
             ", ".join(f"{kl:.4f}" for kl in r["kl_per_iteration"])] for r in rows]
    return table(["variant", "s per iteration", "x baseline speed", "peak RSS GiB", "x baseline memory",
                  "KL per iteration"], "lrrrrl", body) + "\n\n" + source_line("ppo_reference") + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    bench = Bench("ppo_reference", __doc__,
                  lambda p: p.add_argument("--iterations", type=int, help="PPO iterations per variant (4)"))
    if not bench.args.render_only:
        bench.write_json(measure(bench, bench.args.iterations or (2 if bench.smoke else 4)))
    bench.rewrite("BENCHMARKS.md", "ppo_reference", render(bench.read_json()))


if __name__ == "__main__":
    main()
