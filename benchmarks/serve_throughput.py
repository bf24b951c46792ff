"""lmtune serve: 8 concurrent clients on 4 adapters, batched against sequential, in the same run.

One server (the default model with 4 LoRA adapters, greedy decoding) on 127.0.0.1. Eight clients
each send the same list of chat requests, client i to adapter i % 4, all at once. `sequential` lets
the scheduler run one request at a time (max_batch 1): requests for different adapters are served
one after another. `batched` lets it put up to 8 requests, any mix of adapters, in one forward pass.
Both modes run the same requests and must give the same answers (checked); the table reports
generated tokens per second and the ratio. Modes alternate for `--repeats` rounds; medians reported.

    python benchmarks/serve_throughput.py            # default model; writes results/serve_throughput.json
    python benchmarks/serve_throughput.py --smoke    # 2-layer random model, seconds, writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_common import make_adapters, model_folder  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three colours.", "How do plants make food?",
             "Write one sentence about the sea.", "What is 12 times 7?", "Give a tip for sleeping well."]


async def round_trip(url: str, clients: int, adapters: int, per_client: int, max_tokens: int):
    import httpx

    async def client(i: int) -> list[tuple[str, int]]:
        out = []
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for k in range(per_client):
                question = QUESTIONS[(i + k) % len(QUESTIONS)]
                r = await http.post("/v1/chat/completions", json={
                    "model": f"adapter-{i % adapters}", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": question}]})
                r.raise_for_status()
                body = r.json()
                out.append((body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]))
        return out

    start = time.perf_counter()
    results = await asyncio.gather(*(client(i) for i in range(clients)))
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests-per-client", dest="per_client", type=int, default=3)
    parser.add_argument("--max-tokens", dest="max_tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.per_client, args.max_tokens, args.repeats = 1, 4, 1

    from lmtune.config import RunConfig
    from lmtune.runtime import configure
    from lmtune.serve.app import build_server, create_app, start_in_thread

    configure()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_folder(args.model, args.smoke, work)
        paths = make_adapters(model, args.adapters, work)
        cfg = RunConfig(model_name_or_path=model, do_sample=False)
        server = build_server(cfg, [f"adapter-{i}={p}" for i, p in enumerate(paths)],
                              max_batch=args.clients)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        http = start_in_thread(create_app(server), "127.0.0.1", port)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(round_trip(url, args.clients, args.adapters, 1, 2))  # warm-up
        times: dict[str, list[float]] = {"sequential": [], "batched": []}
        answers: dict[str, list] = {}
        for _ in range(args.repeats):
            for mode, batch in (("sequential", 1), ("batched", args.clients)):
                server.scheduler.max_batch = batch
                batches_before = server.scheduler.batches
                seconds, results = asyncio.run(round_trip(url, args.clients, args.adapters,
                                                          args.per_client, args.max_tokens))
                times[mode].append(seconds)
                answers[mode] = results
                answers[mode + "_batches"] = server.scheduler.batches - batches_before
        http.should_exit = True
        server.scheduler.close()

    same = answers["sequential"] == answers["batched"]
    tokens = sum(n for client in answers["batched"] for _, n in client)
    rows = []
    for mode in ("sequential", "batched"):
        median = statistics.median(times[mode])
        rows.append({"mode": mode, "seconds": round(median, 3),
                     "tokens_per_second": round(tokens / median, 2),
                     "forward_batches": answers[mode + "_batches"]})
    rows[1]["speed_vs_sequential"] = round(rows[0]["seconds"] / rows[1]["seconds"], 3)
    result = {"model": args.model, "clients": args.clients, "adapters": args.adapters,
              "requests": args.clients * args.per_client, "max_tokens": args.max_tokens,
              "generated_tokens": tokens, "repeats": args.repeats, "same_answers": same, "rows": rows}
    print(f"{'mode':<12}{'seconds':>10}{'tokens/s':>12}{'batches':>10}")
    for row in rows:
        print(f"{row['mode']:<12}{row['seconds']:>10}{row['tokens_per_second']:>12}{row['forward_batches']:>10}")
    print(f"batched is {rows[1]['speed_vs_sequential']}x sequential; same answers: {same}")
    if not same:
        sys.exit("batched and sequential answers differ")
    if not args.smoke:
        out = ROOT / "benchmarks" / "results" / "serve_throughput.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
