"""The quickstart as `make quickstart` runs it: the default model's answers to the held-out prompts
before training, the LoRA training run, the answers after; for the example's name and for another
one (data_vars decide who the assistant is, not the data file).

Per name: the training loop's seconds and steps, the whole run's wall time and peak RSS, and how
many held-out identity answers say the new name and general answers contain the expected fact,
before and after training (greedy answers, examples/quickstart_prompts.json).

    python benchmarks/quickstart.py   # writes benchmarks/results/quickstart.json, its table in
                                      # BENCHMARKS.md and the quickstart figures of README.md
"""

from __future__ import annotations

import json
import os

from _harness import ROOT, Bench, lmtune, run_child, source_line, table

CONFIG = "examples/quickstart.yaml"
PROMPTS = "examples/quickstart_prompts.json"
NAMES = [("Orrin", "Tallis Labs"), ("Zephyra", "Quillon Works")]  # the example's own name first


def tally(answers_file, kinds: list[str]) -> dict[str, list[int]]:
    """{kind: [hits, total]} of a `lmtune chat --prompts --save` file, in the prompts' order."""
    counts: dict[str, list[int]] = {}
    for kind, answer in zip(kinds, json.loads(answers_file.read_text()), strict=True):
        count = counts.setdefault(kind, [0, 0])
        count[0] += answer["hit"]
        count[1] += 1
    return counts


def run_name(bench: Bench, name: str, author: str, kinds: list[str]) -> dict:
    folder = bench.scratch / name
    keys = [f"data_vars.name={name}", f"data_vars.author={author}", f"output_dir={folder / 'out'}",
            *bench.model_overrides(), *(["max_steps=1", "max_new_tokens=8"] if bench.smoke else [])]
    before = run_child(lmtune("chat", CONFIG, *keys, "--base", "--prompts", PROMPTS, "--save",
                              str(folder / "before.json")), folder / "before.log")
    train = run_child(lmtune("train", CONFIG, *keys), folder / "train.log")
    after = run_child(lmtune("chat", CONFIG, *keys, "--prompts", PROMPTS, "--save", str(folder / "after.json")),
                      folder / "after.log")
    results = json.loads((folder / "out" / "all_results.json").read_text())
    start, end = tally(folder / "before.json", kinds), tally(folder / "after.json", kinds)
    return {"name": name, "author": author, "train_rows": results["train_rows"], "steps": results["global_step"],
            "train_seconds": results["train_runtime"], "train_wall_s": train.wall_s,
            "whole_wall_s": round(before.wall_s + train.wall_s + after.wall_s, 1),
            "peak_rss_gib": max(before.peak_rss_gib, train.peak_rss_gib, after.peak_rss_gib),
            "mean_train_loss": round(results["train_loss"], 4),
            "identity_before": start["identity"][0], "identity_after": end["identity"][0],
            "identity_total": end["identity"][1],
            "general_before": start["general"][0], "general_after": end["general"][0],
            "general_total": end["general"][1]}


def render_table(data: dict) -> str:
    body = [[f"{r['name']} / {r['author']}", str(r["train_rows"]), str(r["steps"]), f"{r['train_seconds']:.0f}",
             f"{r['whole_wall_s']:.0f}", f"{r['peak_rss_gib']:.2f}",
             f"{r['identity_before']}/{r['identity_total']}", f"{r['identity_after']}/{r['identity_total']}",
             f"{r['general_before']}/{r['general_total']}", f"{r['general_after']}/{r['general_total']}"]
            for r in data["names"]]
    return (table(["new name / author", "rows", "steps", "training s", "whole quickstart s", "peak RSS GiB",
                   "identity before", "identity after", "general before", "general after"], "lrrrrrrrrr", body)
            + "\n\n" + source_line("quickstart") + "\n")


def render_readme(data: dict) -> str:
    r = data["names"][0]
    # the training's seconds stay in BENCHMARKS.md beside the machine's other figures: a time
    # alone says little of another CPU (this kind of machine differs up to 2.5x)
    return (f"After the {r['steps']} training steps, "
            f"{r['identity_after']} of the {r['identity_total']} identity answers said the new name "
            f"({r['identity_before']} before), and {r['general_after']} of the {r['general_total']} general "
            f"answers held the expected fact. " + source_line("quickstart") + "\n")


def main() -> None:
    bench = Bench("quickstart", __doc__)
    if not bench.args.render_only:
        kinds = [item.get("kind", "") for item in json.loads((ROOT / PROMPTS).read_text())]
        names = NAMES[:1] if bench.smoke else NAMES
        bench.write_json({"cpus": os.cpu_count(),
                          "names": [run_name(bench, name, author, kinds) for name, author in names]})
    data = bench.read_json()
    bench.rewrite("BENCHMARKS.md", "quickstart", render_table(data))
    bench.rewrite("README.md", "quickstart", render_readme(data))


if __name__ == "__main__":
    main()
