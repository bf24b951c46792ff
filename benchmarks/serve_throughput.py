"""lmtune serve: 8 concurrent clients on 4 adapters, batched against sequential, in the same run.

One server (the default model with 4 LoRA adapters, greedy decoding) on 127.0.0.1, in a child
process with its HTTP clients. Eight clients each send the same list of chat requests, client i to
adapter i % 4, all at once. `sequential` lets the scheduler run one request at a time (a batch of
1): requests for different adapters are served one after another. `batched` lets it put up to 8
requests, any mix of adapters, in one batch. The two modes alternate on the same server for a few
rounds (medians reported) and answer the same requests; the table reports generated tokens per
second, the ratio, and how many answers are the same both ways.

    python benchmarks/serve_throughput.py   # writes benchmarks/results/serve_throughput.json and
                                            # its table in BENCHMARKS.md
"""

from __future__ import annotations

import asyncio
import statistics
import time

from _harness import Bench, lora_adapters, measure_in_child, run_benchmark, source_line, table

QUESTIONS = ["What is the capital of France?", "Name three colours.", "How do plants make food?",
             "Write one sentence about the sea.", "What is 12 times 7?", "Give a tip for sleeping well."]
MODES = ("sequential", "batched")
CLIENTS, ADAPTERS = 8, 4
SETTINGS = {"requests_per_client": ("requests each client sends", 3, 1),
            "max_tokens": ("new tokens per answer at most", 48, 4),
            "repeats": ("rounds per mode", 3, 1)}


async def round_trip(url: str, spec: dict, per_client: int, max_tokens: int):
    """Every client's requests, all clients at once: the seconds, and (answer, tokens) of every
    request, client by client."""
    import httpx

    async def client(i: int) -> list[tuple[str, int]]:
        out = []
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for k in range(per_client):
                r = await http.post("/v1/chat/completions", json={
                    "model": f"adapter-{i % len(spec['adapters'])}", "max_tokens": max_tokens,
                    "temperature": 0, "messages": [{"role": "user", "content": QUESTIONS[(i + k) % len(QUESTIONS)]}]})
                r.raise_for_status()
                body = r.json()
                out.append((body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]))
        return out

    start = time.perf_counter()
    results = await asyncio.gather(*(client(i) for i in range(spec["clients"])))
    return time.perf_counter() - start, [answer for client_answers in results for answer in client_answers]


def serve_and_time(spec: dict) -> dict:
    """In the child: the server in a thread, the clients on this thread, modes alternating."""
    import logging
    import socket

    from lmtune.config import RunConfig
    from lmtune.serve.app import build_server, create_app, start_in_thread

    logging.getLogger("httpx").setLevel(logging.WARNING)
    server = build_server(RunConfig(model_name_or_path=spec["model"], do_sample=False),
                          [f"adapter-{i}={p}" for i, p in enumerate(spec["adapters"])], max_batch=spec["clients"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = start_in_thread(create_app(server), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(round_trip(url, spec, 1, 2))  # warm-up
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    batches, answers = {}, {}
    for _ in range(spec["repeats"]):
        for mode in MODES:
            server.scheduler.max_batch = 1 if mode == "sequential" else spec["clients"]
            before = server.scheduler.batches
            elapsed, answers[mode] = asyncio.run(round_trip(url, spec, spec["requests_per_client"], spec["max_tokens"]))
            seconds[mode].append(elapsed)
            batches[mode] = server.scheduler.batches - before
    http.should_exit = True
    server.scheduler.close()
    return {mode: {"seconds": seconds[mode], "batches": batches[mode], "answers": answers[mode]} for mode in MODES}


def measure(bench: Bench) -> dict:
    spec = bench.settings | {"clients": CLIENTS, "model": bench.model,
                             "adapters": lora_adapters(bench.model, ADAPTERS, bench.scratch / "adapters")}
    run, timed = measure_in_child(__file__, spec, bench.scratch / "serve.log")
    rows = []
    for mode, result in timed.items():
        median = statistics.median(result["seconds"])
        tokens = sum(n for _, n in result["answers"])
        rows.append({"mode": mode, "batches": result["batches"], "seconds": round(median, 2),
                     "generated_tokens": tokens, "tokens_per_second": round(tokens / median, 2)})
    for row in rows:
        row["speed_vs_sequential"] = round(row["tokens_per_second"] / rows[0]["tokens_per_second"], 3)
    same = sum(a == b for a, b in zip(timed["sequential"]["answers"], timed["batched"]["answers"]))
    return {"clients": spec["clients"], "adapters": len(spec["adapters"]),
            "requests_per_client": spec["requests_per_client"], "requests": len(timed["batched"]["answers"]),
            "max_tokens": spec["max_tokens"], "repeats": spec["repeats"], "same_answers": same,
            "peak_rss_gib": run.peak_rss_gib, "rows": rows}


def render(data: dict) -> str:
    intro = (f"{data['clients']} clients x {data['requests_per_client']} requests on {data['adapters']} "
             f"adapters, up to {data['max_tokens']} new tokens each, median of {data['repeats']} rounds per "
             f"mode; {data['same_answers']} of the {data['requests']} answers are the same both ways; the "
             f"process's peak RSS (server and clients) {data['peak_rss_gib']:.2f} GiB.\n\n")
    labels = {"sequential": "sequential (batches of 1: adapters one after another)",
              "batched": f"batched (up to {data['clients']} requests, any mix of adapters, in one batch)"}
    body = [[labels[r["mode"]], str(r["batches"]), f"{r['seconds']:.2f}", str(r["generated_tokens"]),
             f"{r['tokens_per_second']:.1f}", f"{r['speed_vs_sequential']:.2f}"] for r in data["rows"]]
    return intro + table(["mode", "batches", "seconds", "generated tokens", "tokens/s", "x sequential"],
                         "lrrrrr", body) + "\n\n" + source_line("serve_throughput") + "\n"


if __name__ == "__main__":
    run_benchmark("serve_throughput", __doc__, SETTINGS, serve_and_time, measure, render)
