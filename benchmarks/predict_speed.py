"""Predict speed: 48 answers of up to 64 new tokens, generated batched (prompts sorted by length,
left padding, as `lmtune predict` generates them) against one by one, with the same loaded model in
one child process.

The prompts are the first of lmtune's 100 built-in replay prompts (then the questions of
data/concise_prompts.json + concise_prompts_heldout.json for a larger --predictions), each rendered
by the chat template.
Greedy decoding, so both ways should give the same answers; how many do is reported.

    python benchmarks/predict_speed.py   # writes benchmarks/results/predict_speed.json and its table
                                         # in BENCHMARKS.md
"""

from __future__ import annotations

import json

from _harness import ROOT, Bench, measure_in_child, run_benchmark, source_line, table

SETTINGS = {"predictions": ("prompts answered each way", 48, 8),
            "max_new_tokens": ("new tokens per answer at most", 64, 4),
            "batch_size": ("prompts per batch when batched", 16, 4)}


def prompts(n: int) -> list[str]:
    from lmtune.data.replay_prompts import GENERAL_PROMPTS

    texts = list(GENERAL_PROMPTS)
    for name in ("concise_prompts.json", "concise_prompts_heldout.json"):
        texts += [r["instruction"] for r in json.loads((ROOT / "data" / name).read_text())]
    if n > len(texts):
        raise SystemExit(f"--predictions {n}: only {len(texts)} prompts are available")
    return texts[:n]


def generate_both_ways(spec: dict) -> dict:
    """In the child: one model load, a warm-up, then one by one and batched."""
    from lmtune.data.encode import ChatEncoder
    from lmtune.evaluate.predict import Generation, generate_batched
    from lmtune.models.load import load_model, load_tokenizer, resolve_model, stop_token_ids

    path = resolve_model(spec["model"])
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    encoder = ChatEncoder(tokenizer, stop_token_ids(tokenizer, model), 4096)
    ids = [encoder.prompt_ids([{"role": "user", "content": text}]) for text in prompts(spec["predictions"])]
    settings = Generation(max_new_tokens=spec["max_new_tokens"])
    stops = sorted(encoder.stop_ids)
    generate_batched(model, tokenizer.pad_token_id, ids[:2], settings, stops, 2, desc="warm-up")
    runs = {}
    for mode, batch in (("one by one", 1), ("batched", spec["batch_size"])):
        answers, timing = generate_batched(model, tokenizer.pad_token_id, ids, settings, stops, batch, desc=mode)
        runs[mode] = {"batch_size": batch, "seconds": timing["runtime"], "new_tokens": timing["new_tokens"],
                      "answers": answers}
    return runs


def measure(bench: Bench) -> dict:
    spec = bench.settings
    run, runs = measure_in_child(__file__, spec | {"model": bench.model}, bench.scratch / "predict.log")
    rows = [{"mode": mode, "batch_size": r["batch_size"], "seconds": round(r["seconds"], 2),
             "new_tokens": r["new_tokens"], "tokens_per_second": round(r["new_tokens"] / r["seconds"], 1)}
            for mode, r in runs.items()]
    for row in rows:  # the same prompts both ways: time is what differs
        row["speed_vs_one_by_one"] = round(rows[0]["seconds"] / row["seconds"], 2)
    same = sum(a == b for a, b in zip(runs["one by one"]["answers"], runs["batched"]["answers"]))
    return {"predictions": spec["predictions"], "max_new_tokens": spec["max_new_tokens"],
            "identical_answers": same, "peak_rss_gib": run.peak_rss_gib, "rows": rows}


def render(data: dict) -> str:
    intro = (f"{data['predictions']} predictions of up to {data['max_new_tokens']} new tokens; "
             f"{data['identical_answers']} of the {data['predictions']} answers are the same both ways; the "
             f"process's peak RSS {data['peak_rss_gib']:.2f} GiB.\n\n")
    body = [[r["mode"], str(r["batch_size"]), f"{r['seconds']:.2f}", str(r["new_tokens"]),
             f"{r['tokens_per_second']:.1f}", f"{r['speed_vs_one_by_one']:.2f}"] for r in data["rows"]]
    return intro + table(["generation", "batch", "seconds", "new tokens", "tokens/s", "x one by one"],
                         "lrrrrr", body) + "\n\n" + source_line("predict_speed") + "\n"


if __name__ == "__main__":
    run_benchmark("predict_speed", __doc__, SETTINGS, generate_both_ways, measure, render)
