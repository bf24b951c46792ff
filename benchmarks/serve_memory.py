"""lmtune serve: resident memory of the base alone, with 1 adapter and with 8, in the same run.

Each variant runs in its own child process, one after another: it builds the server (the default
model and N LoRA r=8 adapters on every linear layer), answers one short greedy chat request per
served model, and reports its resident memory (RSS) then and its peak. Extra memory per adapter is
compared with the adapter's file size and with what serving each adapter on its own copy of the
base would cost (8 servers of one adapter each).

    python benchmarks/serve_memory.py            # default model; writes results/serve_memory.json
    python benchmarks/serve_memory.py --smoke    # 2-layer random model, seconds, writes nothing
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_common import folder_bytes, make_adapters, model_folder  # noqa: E402

MIB = 2**20


def child(model: str, adapters: list[str], out: str) -> None:
    from lmtune.config import RunConfig
    from lmtune.infer.generate import GenRow, Sampling
    from lmtune.measure import peak_rss_bytes
    from lmtune.runtime import configure
    from lmtune.serve.app import build_server

    configure()
    server = build_server(RunConfig(model_name_or_path=model, do_sample=False),
                          [f"adapter-{i}={p}" for i, p in enumerate(adapters)])
    models = server.adapters.models
    for served in list(models.values()):
        ids = next(iter(models.values())).encoder.prompt_ids(
            [{"role": "user", "content": "What is the capital of France?"}])
        with server.adapters.lock:
            server.adapters.generate(served, [GenRow(ids, Sampling(max_new_tokens=8), served.stop_ids,
                                                     served.name)], lambda i, t: True)
    server.scheduler.close()
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    peak = peak_rss_bytes()  # this process's own high-water mark, not the parent's
    Path(out).write_text(json.dumps({"rss": rss, "peak": peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, out, *adapters = args.child
        child(model, adapters, out)
        return

    from lmtune.runtime import configure

    configure()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_folder(args.model, args.smoke, work)
        paths = make_adapters(model, 8, work)
        adapter_mib = folder_bytes(paths[0]) / MIB
        base_mib = folder_bytes(model) / MIB
        for count in (0, 1, 8):
            out = work / f"mem-{count}.json"
            subprocess.run([sys.executable, __file__, "--child", model, str(out), *paths[:count]],
                           check=True, cwd=ROOT, capture_output=True)
            measured = json.loads(out.read_text())
            rows.append({"adapters": count, "rss_mib": round(measured["rss"] / MIB, 1),
                         "peak_rss_mib": round(measured["peak"] / MIB, 1)})
    base = rows[0]["rss_mib"]
    for row in rows[1:]:
        row["mib_per_adapter"] = round((row["rss_mib"] - base) / row["adapters"], 2)
    eight = rows[-1]
    result = {"model": args.model, "adapter": "LoRA r=8, all linear layers",
              "adapter_file_mib": round(adapter_mib, 2), "base_weights_mib": round(base_mib, 1),
              "rows": rows,
              "eight_adapters_vs_eight_servers": round(eight["rss_mib"] / (8 * rows[1]["rss_mib"]), 3)}
    print(f"{'adapters':>8}{'RSS MiB':>10}{'peak MiB':>10}{'MiB/adapter':>13}")
    for row in rows:
        print(f"{row['adapters']:>8}{row['rss_mib']:>10}{row['peak_rss_mib']:>10}"
              f"{row.get('mib_per_adapter', ''):>13}")
    print(f"adapter file {result['adapter_file_mib']} MiB; 8 adapters on one base use "
          f"{result['eight_adapters_vs_eight_servers']}x the memory of 8 one-adapter servers")
    if not args.smoke:
        target = ROOT / "benchmarks" / "results" / "serve_memory.json"
        target.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
