"""PPO's reference model: the policy with its LoRA adapter switched off, against a second copy of
the model loaded as ref_model (what a PPO without adapter tricks keeps in memory).

Each variant runs examples/ppo.yaml for a few iterations in its own child process, one after the
other, with a verifiable reward defined here (so no reward model is loaded and the comparison is
the reference alone), and reports the child's peak RSS, seconds per iteration and the KL it logged.

    python benchmarks/ppo_reference.py       # prints a table, writes benchmarks/results/ppo_reference.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "ref_model copy": "baseline: the reference loaded as a second model (ref_model: default)",
    "adapter off": "lmtune's default: the policy itself with its LoRA adapter disabled",
}


def brevity(prompts: list[str], replies: list[str]) -> list[float]:
    """Shorter replies score higher: a reward any policy can move on."""
    return [-len(reply.split()) / 10 for reply in replies]


def run_variant(variant: str, output_dir: str, iterations: int) -> None:
    """Child process: one PPO run."""
    from lmtune.cli import main

    overrides = [f"output_dir={output_dir}", f"max_steps={iterations}", "reward_model=ppo_reference:brevity",
                 "plot_loss=false", "save_steps=100000", "eval_dataset=null"]
    if variant == "ref_model copy":
        overrides.append("ref_model=default")
    code = main(["train", str(ROOT / "examples" / "ppo.yaml"), *overrides])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (Path(output_dir) / "peak_rss_kib.json").write_text(json.dumps(peak_kib))
    sys.exit(code)


def measure(iterations: int) -> list[dict]:
    rows = []
    for variant, meaning in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            subprocess.run([sys.executable, __file__, "--child", variant, "--out", str(out),
                            "--iterations", str(iterations)], check=True, cwd=ROOT, capture_output=True)
            peak_kib = json.loads((out / "peak_rss_kib.json").read_text())
            log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        steps = [r for r in log if r["step"] > 1]  # the first iteration warms up
        rows.append({"variant": variant, "meaning": meaning, "iterations": iterations,
                     "seconds_per_iteration": round(statistics.median(r["seconds"] for r in steps), 2),
                     "peak_rss_gib": round(peak_kib / 2**20, 3),
                     "kl_per_iteration": [r["kl"] for r in log if r["step"] > 0]})
    base = rows[0]
    for row in rows:
        row["memory_vs_baseline"] = round(row["peak_rss_gib"] / base["peak_rss_gib"], 3)
        row["speed_vs_baseline"] = round(base["seconds_per_iteration"] / row["seconds_per_iteration"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        run_variant(args.child, args.out, args.iterations)
        return
    rows = measure(args.iterations)
    print(f"{'variant':<16}{'s/iteration':>13}{'x speed':>9}{'peak RSS GiB':>14}{'x memory':>10}")
    for r in rows:
        print(f"{r['variant']:<16}{r['seconds_per_iteration']:>13.2f}{r['speed_vs_baseline']:>9.2f}"
              f"{r['peak_rss_gib']:>14.2f}{r['memory_vs_baseline']:>10.2f}  kl {r['kl_per_iteration']}")
    out = ROOT / "benchmarks" / "results" / "ppo_reference.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
