"""An eval of the sample benchmark (data/mmlu_sample, 4 subjects, 32 questions, 5-shot) on the
default model: accuracy per category and how fast questions are scored, batched (batch_size 8)
against one question per forward pass, with the same loaded model in the same run.

    python benchmarks/eval_sample.py      # prints a table, writes benchmarks/results/eval_sample.json
    python benchmarks/eval_sample.py --model PATH --n-shot 1 --out /tmp/x.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="mmlu_sample_test")
    parser.add_argument("--n-shot", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_sample.json"))
    args = parser.parse_args()

    import torch

    from lmtune.config import build_config
    from lmtune.evaluate.benchmarks import evaluate_config
    from lmtune.models.load import load_model, load_tokenizer, resolve_model
    from lmtune.runtime import configure

    configure()
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    runs = {}
    for name, batch in (("batched", args.batch_size), ("one by one", 1)):
        cfg = build_config({"model_name_or_path": args.model, "task": args.task,
                            "task_dir": str(ROOT / "data"), "n_shot": args.n_shot, "batch_size": batch})
        start = time.perf_counter()
        scores = evaluate_config(cfg, model, tokenizer, label=name)
        seconds = time.perf_counter() - start
        questions = sum(len(s.answers) for s in scores.subjects)
        runs[name] = {"batch_size": batch, "seconds": round(seconds, 2), "questions": questions,
                      "questions_per_second": round(questions / seconds, 2),
                      "categories": scores.categories(),
                      "predictions": [p for s in scores.subjects for p in s.predictions]}
    same = runs["batched"].pop("predictions") == runs["one by one"].pop("predictions")
    result = {"benchmark": "eval_sample", "model": args.model, "task": args.task,
              "n_shot": args.n_shot, "runs": runs,
              "speedup": round(runs["one by one"]["seconds"] / runs["batched"]["seconds"], 2),
              "same_predictions": same, "torch_threads": torch.get_num_threads()}
    for name, run in runs.items():
        print(f"{name:<12} batch {run['batch_size']:>2}: {run['seconds']:>7} s, "
              f"{run['questions_per_second']} questions/s, accuracy {run['categories']}")
    print(f"speed-up {result['speedup']}x; same predictions: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
