"""Data-layer speed: encoding throughput against baselines, and `lmtune plan` on large files.

Encoding: the same synthetic conversations (single- and multi-turn, default tokenizer) encoded
  - baseline `template-ids`: apply_chat_template(tokenize=True) per conversation, ids only, no labels
  - `one-by-one`: lmtune's encoder called per conversation (one tokenizer call each, as before)
  - `batched`: lmtune's encoder, 256 conversations per tokenizer call (the default)
  - `batched, 2 workers`: preprocessing_num_workers: 2
Plan: `lmtune plan --json` in a fresh process on 80,000 + 260,000 synthetic records with
max_samples 1000, encoding afresh and then from the cache, against reading every record with
json.loads (what an eager reader spends before it could sample).

    python benchmarks/data_throughput.py   # writes benchmarks/results/data_throughput.json and its
                                           # tables in BENCHMARKS.md
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

from _harness import Bench, lmtune, run_child, source_line, table

ENCODING = {
    "template-ids": "baseline: `apply_chat_template(tokenize=True)` per conversation, ids only, no labels",
    "one-by-one": "lmtune, one conversation per call",
    "batched": "lmtune, 256 conversations per tokenizer call (default)",
    "batched, 2 workers": "lmtune, `preprocessing_num_workers: 2`",
}
PLAN = {
    "baseline: json.loads": "baseline: `json.loads` of every record (no tokenizer, no model, no plan)",
    "lmtune plan, encoding afresh": "`lmtune plan --json`, encoding the kept rows afresh (`overwrite_cache=true`)",
    "lmtune plan, encoded rows from the cache": "`lmtune plan --json`, encoded rows from the cache",
}
# As the lmtune CLI sets it: the tokenizer's own Rust threads stay off, so one process uses one core.
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the encoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def conversations(n: int):
    from lmtune.data.formats import Conversation

    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Question {i}: write a function that adds {i} to x."},
                    {"role": "assistant", "content": f"def add(x):\n    return x + {i}\n# adds {i}, as asked."}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "And explain it in one sentence, please."},
                         {"role": "assistant", "content": f"It returns its input plus {i}, nothing else."}]
        out.append(Conversation(messages))
    return out


def encoding(n: int, repeats: int) -> list[dict]:
    from lmtune.config import build_config
    from lmtune.data.encode import ChatEncoder
    from lmtune.data.pipeline import encode_all
    from lmtune.models.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("default"))
    encoder = ChatEncoder(tokenizer, [tokenizer.eos_token_id], 2048)
    convs = conversations(n)
    build_config({})  # import cost outside the timings
    variants = {
        "template-ids": lambda: [tokenizer.apply_chat_template(c.messages, tokenize=True) for c in convs],
        "one-by-one": lambda: [encoder.encode(c) for c in convs],
        "batched": lambda: encode_all(encoder, convs, 1, "bench"),
        "batched, 2 workers": lambda: encode_all(encoder, convs, 2, "bench"),
    }
    tokens = sum(len(row.input_ids) for row, _ in encoder.encode_conversations(convs))
    rows = []
    for name, run in variants.items():
        times, cpu = [], []
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), cpu_seconds()
            run()
            times.append(time.perf_counter() - started)
            cpu.append(cpu_seconds() - cpu_started)
        seconds = statistics.median(times)
        rows.append({"variant": name, "conversations": n, "repeats": repeats, "seconds": round(seconds, 3),
                     "cpu_seconds": round(statistics.median(cpu), 3), "mean_tokens": round(tokens / n, 1),
                     "conversations_per_second": round(n / seconds), "tokens_per_second": round(tokens / seconds)})
    base = rows[0]["seconds"]
    for row in rows:
        row["speed_vs_baseline"] = round(base / row["seconds"], 2)
    return rows


def plan_timing(bench: Bench, sizes: dict[str, int], max_samples: int) -> list[dict]:
    data = bench.scratch / "plan-data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n in sizes.items():
        with open(data / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"instruction": f"{name} task {i}: write a function that adds {i}.",
                                    "output": f"def add(x):\n    return x + {i}"}) + "\n")
    (data / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.jsonl"} for name in sizes}))
    config = data / "plan.yaml"
    config.write_text(f"model_name_or_path: {bench.model}\ndataset: {','.join(sizes)}\ndataset_dir: {data}\n"
                      f"max_samples: {max_samples}\ncutoff_len: 1024\n")
    started = time.perf_counter()
    for name in sizes:
        with open(data / f"{name}.jsonl") as f:
            [json.loads(line) for line in f]
    rows = [{"variant": "baseline: json.loads", "records": sum(sizes.values()),
             "seconds": round(time.perf_counter() - started, 2)}]
    for label, extra in (("lmtune plan, encoding afresh", ["overwrite_cache=true"]),
                         ("lmtune plan, encoded rows from the cache", [])):
        run = run_child(lmtune("plan", str(config), *extra, "--json"), bench.scratch / f"{label}.json")
        plan = json.loads(run.log.read_text())
        rows.append({"variant": label, "seconds": run.wall_s, "peak_rss_gib": run.peak_rss_gib,
                     "found": [d["found"] for d in plan["data"]["datasets"]],
                     "kept": [d["kept"] for d in plan["data"]["datasets"]]})
    return rows


def render_plan(rows: list[dict]) -> str:
    found, kept = rows[1]["found"], rows[1]["kept"]
    body = [[PLAN[r["variant"]], f"{r['seconds']:.2f}"] for r in rows]
    return (f"{' + '.join(f'{n:,}' for n in found)} records found, {' + '.join(f'{n:,}' for n in kept)} kept:\n\n"
            + table(["variant", "seconds"], "lr", body) + "\n\n" + source_line("data_throughput") + "\n")


def render_encoding(rows: list[dict]) -> str:
    body = [[ENCODING[r["variant"]], f"{r['conversations_per_second']:,}", f"{r['tokens_per_second']:,}",
             f"{r['speed_vs_baseline']:.2f}", f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}"] for r in rows]
    return (f"{rows[0]['conversations']:,} conversations:\n\n"
            + table(["variant", "conv/s", "tokens/s", "x baseline", "wall s", "CPU s"], "lrrrrr", body)
            + "\n\n" + source_line("data_throughput") + "\n")


def main() -> None:
    bench = Bench("data_throughput", __doc__)
    if not bench.args.render_only:
        if bench.smoke:
            encode_rows = encoding(200, 1)
            plan_rows = plan_timing(bench, {"magicoder": 800, "codefeedback": 2_600}, 10)
        else:
            encode_rows = encoding(20_000, 3)
            plan_rows = plan_timing(bench, {"magicoder": 80_000, "codefeedback": 260_000}, 1000)
        bench.write_json({"encoding": encode_rows, "plan": plan_rows})
    results = bench.read_json()
    bench.rewrite("BENCHMARKS.md", "data_plan", render_plan(results["plan"]))
    bench.rewrite("BENCHMARKS.md", "data_encoding", render_encoding(results["encoding"]))


if __name__ == "__main__":
    main()
