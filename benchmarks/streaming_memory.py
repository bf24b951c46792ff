"""Streaming memory: the same short `lmtune train` run with `streaming: true` on a small and on a
large JSON Lines file, and without streaming on the small one.

Each run (default model, LoRA, `max_steps` steps of 4 rows, cutoff_len 256) is its own process, one
after another, with an empty encoded-data cache; the table gives its peak RSS and wall time. Streaming
reads, encodes and shuffles records as the loop asks for them, so its peak should not grow with the
file; the run without streaming encodes and caches every record before its first step (it is not run
on the large file, whose encoding is what streaming avoids).

    python benchmarks/streaming_memory.py   # writes benchmarks/results/streaming_memory.json and
                                            # its table in BENCHMARKS.md
"""

from __future__ import annotations

import json
from pathlib import Path

from _harness import Bench, lmtune, run_child, source_line, table

SETTINGS = {"records": ("records in the small file", 20_000, 300),
            "factor": ("the large file holds this many times more", 100, 10),
            "steps": ("optimizer steps of each run", 5, 2)}


def write_records(path: Path, n: int) -> float:
    """n alpaca records of a few hundred bytes; -> the file's size in MiB."""
    with open(path, "w") as out:
        for i in range(n):
            out.write(json.dumps({"instruction": f"Task {i}: summarise the note below in one line.",
                                  "input": f"Note {i}: " + "the meeting moved to Thursday; " * 8,
                                  "output": f"Summary {i}: the meeting is on Thursday."}) + "\n")
    return round(path.stat().st_size / 2**20, 1)


def train(bench: Bench, data: Path, streaming: bool, steps: int, label: str) -> dict:
    run_dir = bench.scratch / label.replace(" ", "-")
    config = run_dir / "run.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f"model_name_or_path: {bench.model}\ndataset: {data}\noutput_dir: {run_dir / 'out'}\n"
        f"overwrite_output_dir: true\nfinetuning_type: lora\ncutoff_len: 256\n"
        f"per_device_train_batch_size: 4\nmax_steps: {steps}\nlogging_steps: 1\n"
        f"save_strategy: 'no'\nplot_loss: false\nstreaming: {str(streaming).lower()}\n")
    run = run_child(lmtune("train", str(config)), run_dir / "train.log",
                    env={"LMTUNE_HOME": str(run_dir / "home")})
    cached = list((run_dir / "home" / "data").glob("*.safetensors"))
    return {"variant": label, "streaming": streaming, "peak_rss_gib": run.peak_rss_gib,
            "wall_s": round(run.wall_s, 1), "cache_entries": len(cached)}


def measure(bench: Bench) -> dict:
    n, factor, steps = (bench.settings[k] for k in ("records", "factor", "steps"))
    folder = bench.scratch / "data"
    folder.mkdir(parents=True, exist_ok=True)
    small, large = folder / "small.jsonl", folder / "large.jsonl"
    sizes = {"small": write_records(small, n), "large": write_records(large, n * factor)}
    rows = []
    for label, path, size, records, streaming in (
            ("streaming, small file", small, sizes["small"], n, True),
            ("streaming, large file", large, sizes["large"], n * factor, True),
            ("encoded and cached first, small file", small, sizes["small"], n, False)):
        row = train(bench, path, streaming, steps, label)
        rows.append(row | {"records": records, "file_mib": size})
        print(rows[-1])
    return {"steps": steps, "runs": rows}


def render(results: dict) -> str:
    body = [[r["variant"], f"{r['records']:,}", f"{r['file_mib']:,.1f}", f"{r['peak_rss_gib']:.3f}",
             f"{r['wall_s']:.1f}", f"{r['cache_entries']}"] for r in results["runs"]]
    return (f"{results['steps']} optimizer steps each:\n\n"
            + table(["run", "records", "file MiB", "peak RSS GiB", "wall s", "cache entries"],
                    "lrrrrr", body)
            + "\n\n" + source_line("streaming_memory") + "\n")


def main() -> None:
    bench = Bench("streaming_memory", __doc__, settings=SETTINGS)
    if not bench.args.render_only:
        bench.write_json(measure(bench))
    bench.rewrite("BENCHMARKS.md", "streaming_memory", render(bench.read_json()))


if __name__ == "__main__":
    main()
