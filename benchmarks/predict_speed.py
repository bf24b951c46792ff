"""Predict speed: 200 answers of up to 64 new tokens, generated batched (prompts sorted by length,
left padding) against one by one, with the same loaded model in the same run.

The prompts are lmtune's 100 built-in replay prompts and the first 100 questions of
data/concise_prompts.json + concise_prompts_heldout.json, each rendered by the chat template.
Greedy decoding, so both ways should give the same answers; the share that match is reported.

    python benchmarks/predict_speed.py      # prints a table, writes benchmarks/results/predict_speed.json
    python benchmarks/predict_speed.py --model PATH --n 8 --max-new-tokens 4 --out /tmp/x.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def prompts(n: int) -> list[str]:
    from lmtune.data.replay_prompts import GENERAL_PROMPTS

    texts = list(GENERAL_PROMPTS)
    for name in ("concise_prompts.json", "concise_prompts_heldout.json"):
        texts += [r["instruction"] for r in json.loads((ROOT / "data" / name).read_text())]
    if n > len(texts):
        raise SystemExit(f"--n {n}: only {len(texts)} prompts available")
    return texts[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_speed.json"))
    args = parser.parse_args()

    import torch

    from lmtune.data.encode import ChatEncoder
    from lmtune.evaluate.predict import Generation, generate_batched
    from lmtune.models.load import load_model, load_tokenizer, resolve_model, stop_token_ids
    from lmtune.runtime import configure

    configure()
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    encoder = ChatEncoder(tokenizer, stop_token_ids(tokenizer, model), 4096)
    ids = [encoder.prompt_ids([{"role": "user", "content": t}]) for t in prompts(args.n)]
    settings = Generation(max_new_tokens=args.max_new_tokens)
    stops = sorted(encoder.stop_ids)
    generate_batched(model, tokenizer.pad_token_id, ids[:2], settings, stops, 2, desc="warm-up")
    runs = {}
    for name, batch in (("batched", args.batch_size), ("one by one", 1)):
        answers, timing = generate_batched(model, tokenizer.pad_token_id, ids, settings, stops, batch,
                                           desc=name)
        runs[name] = {"batch_size": batch, "seconds": round(timing["runtime"], 2),
                      "new_tokens": timing["new_tokens"],
                      "tokens_per_second": round(timing["new_tokens"] / timing["runtime"], 1),
                      "answers": answers}
    same = sum(a == b for a, b in zip(runs["batched"]["answers"], runs["one by one"]["answers"]))
    for run in runs.values():
        del run["answers"]
    result = {"benchmark": "predict_speed", "model": args.model, "predictions": args.n,
              "max_new_tokens": args.max_new_tokens, "decoding": "greedy", "runs": runs,
              "speedup": round(runs["one by one"]["seconds"] / runs["batched"]["seconds"], 2),
              "identical_answers": same, "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine()}
    print(f"{'':<12}{'batch':>6}{'seconds':>10}{'new tokens':>12}{'tokens/s':>10}")
    for name, run in runs.items():
        print(f"{name:<12}{run['batch_size']:>6}{run['seconds']:>10}{run['new_tokens']:>12}"
              f"{run['tokens_per_second']:>10}")
    print(f"speed-up {result['speedup']}x; {same}/{args.n} answers identical")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
