"""Data-layer speed: encoding throughput against baselines, and `lmtune plan` on large files.

Encoding: the same synthetic conversations (single- and multi-turn, default tokenizer) encoded
  - baseline `template-ids`: apply_chat_template(tokenize=True) per conversation, ids only, no labels
  - `one-by-one`: lmtune's encoder called per conversation (one tokenizer call each, as before)
  - `batched`: lmtune's encoder, 256 conversations per tokenizer call (the default)
  - `batched, 2 workers`: preprocessing_num_workers: 2
Plan: `lmtune plan --json` in a fresh process on 80,000 + 260,000 synthetic records with
max_samples 1000, encoding afresh and then from the cache, against reading every record with
json.loads (what an eager reader spends before it could sample).

    python benchmarks/data_throughput.py      # prints tables, writes benchmarks/results/data_throughput.json
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 3
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


def encoding(n: int) -> list[dict]:
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
        for _ in range(REPEATS):
            started, cpu_started = time.perf_counter(), cpu_seconds()
            run()
            times.append(time.perf_counter() - started)
            cpu.append(cpu_seconds() - cpu_started)
        seconds = statistics.median(times)
        rows.append({"variant": name, "conversations": n, "seconds": round(seconds, 3),
                     "cpu_seconds": round(statistics.median(cpu), 3),
                     "conversations_per_second": round(n / seconds), "tokens_per_second": round(tokens / seconds)})
    base = rows[0]["seconds"]
    for row in rows:
        row["speed_vs_baseline"] = round(base / row["seconds"], 2)
    return rows


def plan_timing() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for name, n in (("magicoder", 80_000), ("codefeedback", 260_000)):
            with open(data / f"{name}.jsonl", "w") as f:
                for i in range(n):
                    f.write(json.dumps({"instruction": f"{name} task {i}: write a function that adds {i}.",
                                        "output": f"def add(x):\n    return x + {i}"}) + "\n")
        (data / "dataset_info.json").write_text(json.dumps(
            {name: {"file_name": f"{name}.jsonl"} for name in ("magicoder", "codefeedback")}))
        config = data / "plan.yaml"
        config.write_text(f"dataset: magicoder,codefeedback\ndataset_dir: {data}\nmax_samples: 1000\n"
                          "cutoff_len: 1024\n")
        started = time.perf_counter()
        for name in ("magicoder", "codefeedback"):
            with open(data / f"{name}.jsonl") as f:
                [json.loads(line) for line in f]
        rows.append({"variant": "baseline: json.loads of all 340,000 records (no tokenizer, no model)",
                     "seconds": round(time.perf_counter() - started, 2)})
        for label, extra in (("lmtune plan, encoding afresh", ["overwrite_cache=true"]),
                             ("lmtune plan, encoded rows from the cache", [])):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "lmtune.cli", "plan", str(config), *extra, "--json"],
                                  capture_output=True, text=True, check=True, cwd=ROOT)
            seconds = time.perf_counter() - started
            plan = json.loads(done.stdout)
            rows.append({"variant": label, "seconds": round(seconds, 2),
                         "found": [d["found"] for d in plan["data"]["datasets"]],
                         "kept": [d["kept"] for d in plan["data"]["datasets"]]})
    return rows


def main() -> None:
    encode_rows = encoding(20_000)
    print(f"{'encoding (20,000 conversations)':<32}{'conv/s':>8}{'tokens/s':>10}{'x baseline':>12}"
          f"{'wall s':>8}{'CPU s':>8}")
    for r in encode_rows:
        print(f"{r['variant']:<32}{r['conversations_per_second']:>8,}{r['tokens_per_second']:>10,}"
              f"{r['speed_vs_baseline']:>12.2f}{r['seconds']:>8.2f}{r['cpu_seconds']:>8.2f}")
    plan_rows = plan_timing()
    print(f"\n{'plan on 80k + 260k records, max_samples 1000':<70}{'seconds':>10}")
    for r in plan_rows:
        print(f"{r['variant']:<70}{r['seconds']:>10.2f}")
    out = ROOT / "benchmarks" / "results" / "data_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"encoding": encode_rows, "plan": plan_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
