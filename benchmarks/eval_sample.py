"""An eval of the sample benchmark (data/mmlu_sample, MMLU's layout, n-shot from its dev questions)
on the default model, scored as `lmtune eval` scores it: accuracy per category, and how fast
questions are scored batched against one question per forward pass, with the same loaded model in
one child process.

    python benchmarks/eval_sample.py   # writes benchmarks/results/eval_sample.json and its tables in
                                       # BENCHMARKS.md
"""

from __future__ import annotations

from _harness import ROOT, Bench, measure_in_child, run_benchmark, source_line, table

TASK = "mmlu_sample_test"
SETTINGS = {"n_shot": ("dev questions asked before each test question", 5, 1),
            "batch_size": ("questions per forward pass when batched", 8, 8)}


def score_both_ways(spec: dict) -> dict:
    """In the child: one model load, then the benchmark one question at a time and batched."""
    import time

    import torch

    from lmtune.config import build_config
    from lmtune.evaluate.benchmarks import AVERAGE, evaluate_config
    from lmtune.models.load import load_model, load_tokenizer, resolve_model

    path = resolve_model(spec["model"])
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    with torch.no_grad():  # the first forward pass pays one-time set-up costs; neither way should
        model(torch.tensor([tokenizer("A warm-up question.").input_ids]))
    runs = {}
    for mode, batch in (("one by one", 1), ("batched", spec["batch_size"])):
        cfg = build_config({"model_name_or_path": spec["model"], "task": TASK, "task_dir": str(ROOT / "data"),
                            "n_shot": spec["n_shot"], "batch_size": batch})
        start = time.perf_counter()
        scores = evaluate_config(cfg, model, tokenizer, label=mode)
        seconds = time.perf_counter() - start
        questions = {}
        for subject in scores.subjects:
            for key in (subject.category, AVERAGE):
                questions[key] = questions.get(key, 0) + len(subject.answers)
        runs[mode] = {"batch_size": batch, "seconds": seconds, "subjects": len(scores.subjects),
                      "accuracy": scores.categories(), "questions": questions,
                      "predictions": [p for s in scores.subjects for p in s.predictions]}
    return runs


def measure(bench: Bench) -> dict:
    spec = bench.settings
    run, runs = measure_in_child(__file__, spec | {"model": bench.model}, bench.scratch / "eval.log")
    batched = runs["batched"]
    total = len(batched["predictions"])
    rows = [{"mode": mode, "batch_size": r["batch_size"], "seconds": round(r["seconds"], 2),
             "questions_per_second": round(total / r["seconds"], 2)} for mode, r in runs.items()]
    for row in rows:
        row["speed_vs_one_by_one"] = round(rows[0]["seconds"] / row["seconds"], 2)
    same = sum(a == b for a, b in zip(runs["one by one"]["predictions"], batched["predictions"]))
    categories = [{"category": name, "questions": batched["questions"][name], "accuracy": accuracy}
                  for name, accuracy in batched["accuracy"].items()]
    return {"task": TASK, "subjects": batched["subjects"], "questions": total, "n_shot": spec["n_shot"],
            "same_predictions": same, "peak_rss_gib": run.peak_rss_gib, "rows": rows, "categories": categories}


def render(data: dict) -> str:
    intro = (f"{data['subjects']} subjects, {data['questions']} questions, {data['n_shot']}-shot; "
             f"{data['same_predictions']} of the {data['questions']} answers are the same both ways; the "
             f"process's peak RSS {data['peak_rss_gib']:.2f} GiB.\n\n")
    speed = [[r["mode"], str(r["batch_size"]), f"{r['seconds']:.2f}", f"{r['questions_per_second']:.2f}",
              f"{r['speed_vs_one_by_one']:.2f}"] for r in data["rows"]]
    accuracy = [[c["category"], str(c["questions"]), f"{c['accuracy']:.1f}"] for c in data["categories"]]
    source = "\n\n" + source_line("eval_sample") + "\n"
    return (intro + table(["scoring", "batch", "seconds", "questions/s", "x one by one"], "lrrrr", speed) + source
            + "\n" + table(["category", "questions", "accuracy %"], "lrr", accuracy) + source)


if __name__ == "__main__":
    run_benchmark("eval_sample", __doc__, SETTINGS, score_both_ways, measure, render)
