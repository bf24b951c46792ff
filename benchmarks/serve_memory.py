"""lmtune serve: resident memory of the server with the base alone, with 1 adapter and with 8.

Each variant runs in its own child process, one after another: it builds the server (the default
model and N LoRA adapters, r 8 on every linear layer), answers one short greedy chat request per
served model, and reports its resident memory (RSS) then, its peak, and the bytes of the weights it
holds. Memory per extra adapter is compared with the adapter's file size, and 8 adapters on one base
with 8 servers of one adapter each.

    python benchmarks/serve_memory.py   # writes benchmarks/results/serve_memory.json and its table
                                        # in BENCHMARKS.md
"""

from __future__ import annotations

import resource
from pathlib import Path

from _harness import (LORA_RANK, Bench, folder_mib, lora_adapters, measure_in_child, run_benchmark, source_line,
                      table)

COUNTS = (0, 1, 8)
MIB = 2**20


def serve_and_weigh(spec: dict) -> dict:
    """In the child: the server built and every served model asked once; RSS and weight bytes."""
    from lmtune.config import RunConfig
    from lmtune.infer.generate import GenRow, Sampling
    from lmtune.serve.app import build_server

    server = build_server(RunConfig(model_name_or_path=spec["model"], do_sample=False),
                          [f"adapter-{i}={p}" for i, p in enumerate(spec["adapters"])])
    adapters = server.adapters
    for served in list(adapters.models.values()):
        ids = served.encoder.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
        with adapters.lock:
            adapters.generate(served, [GenRow(ids, Sampling(max_new_tokens=8), served.stop_ids, served.name)],
                              lambda i, token: True)
    server.scheduler.close()
    weights = sum(p.numel() * p.element_size() for p in (adapters.peft or adapters.base).parameters())
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return {"rss_bytes": resident_pages * resource.getpagesize(), "weights_bytes": weights}


def measure(bench: Bench) -> dict:
    paths = lora_adapters(bench.model, max(COUNTS), bench.scratch / "adapters")
    rows = []
    for count in COUNTS:
        run, got = measure_in_child(__file__, {"model": bench.model, "adapters": paths[:count]},
                                    bench.scratch / f"serve-{count}.log")
        rows.append({"adapters": count, "weights_mib": round(got["weights_bytes"] / MIB, 2),
                     "rss_mib": round(got["rss_bytes"] / MIB, 1), "peak_rss_mib": round(run.peak_rss_gib * 1024)})
    base, one = rows[0], rows[1]
    for row in rows[1:]:
        row["weights_mib_per_adapter"] = round((row["weights_mib"] - base["weights_mib"]) / row["adapters"], 2)
        row["rss_mib_per_adapter"] = round((row["rss_mib"] - base["rss_mib"]) / row["adapters"], 1)
        row["vs_one_adapter_servers"] = round(row["rss_mib"] / (row["adapters"] * one["rss_mib"]), 3)
    return {"lora_rank": LORA_RANK, "adapter_file_mib": folder_mib(paths[0]), "rows": rows}


def render(data: dict) -> str:
    rows = data["rows"]
    last = rows[-1]
    label = {0: "the base alone", 1: "base + 1 adapter"}
    body = [[label.get(r["adapters"], f"base + {r['adapters']} adapters"), f"{r['weights_mib']:.2f}",
             f"{r['rss_mib']:.1f}", f"{r['peak_rss_mib']:.0f}",
             f"{r['weights_mib_per_adapter']:.2f}" if r["adapters"] else "",
             f"{r['rss_mib_per_adapter']:.1f}" if r["adapters"] else "",
             f"{r['vs_one_adapter_servers']:.2f}" if r["adapters"] else ""] for r in rows]
    summary = (f"One adapter's file (LoRA r {data['lora_rank']}, all linear layers) holds "
               f"{data['adapter_file_mib']:.2f} MiB; with {last['adapters']} adapters each "
               f"costs {last['rss_mib_per_adapter']:.1f} MiB of resident memory over the base alone, whose "
               f"weights take {rows[0]['weights_mib']:.2f} MiB. {last['adapters']} adapters on one base take "
               f"{last['vs_one_adapter_servers']:.2f}x the resident memory of {last['adapters']} one-adapter "
               "servers.\n\n")
    return summary + table(["server", "weights MiB", "resident MiB", "peak MiB", "weights MiB per adapter",
                            "resident MiB per adapter over the base alone", "x the memory of one-adapter servers"],
                           "lrrrrrr", body) + "\n\n" + source_line("serve_memory") + "\n"


if __name__ == "__main__":
    run_benchmark("serve_memory", __doc__, {}, serve_and_weigh, measure, render)
