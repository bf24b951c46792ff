"""One variant, trained in a child process of its own (so the peak memory measured is its own),
measured and scored there; the parent collects what it wrote and the run's own result files."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lmtune.compare.spec import CompareSpec, Variant
from lmtune.config import build_config
from lmtune.errors import LmtuneError
from lmtune.measure import device_name, peak_rss_bytes, run_child

RESULT_FILE = "compare_variant.json"  # what a child measured, in its variant's folder


def child_main(job_json: str) -> int:
    """`python -m lmtune.compare JOB`: train one variant, measure it, score it."""
    from lmtune.compare.scoring import task_score
    from lmtune.runtime import configure
    from lmtune.train import STAGES

    configure()
    job = json.loads(job_json)
    result_path = Path(job["result"])
    try:
        cfg = build_config(job["config"], source=f"variant {job['name']}")
        start = time.perf_counter()
        STAGES[cfg.stage](cfg)
        # Measured before scoring: the peak is the training's, not the answering's.
        measured: dict[str, Any] = {"wall_s": round(time.perf_counter() - start, 2),
                                    "peak_rss_bytes": peak_rss_bytes(), "device": device_name()}
        import torch

        if torch.cuda.is_available():
            measured["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        measured["score"] = task_score(cfg, **job["score"])
    except LmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps({"error": str(exc)}))
        return 2
    result_path.write_text(json.dumps(measured, indent=2))
    return 0


def run_variant(variant: Variant, spec: CompareSpec) -> dict[str, Any]:
    folder = Path(variant.config["output_dir"])
    result_path = folder / RESULT_FILE
    result_path.unlink(missing_ok=True)  # never report an earlier run's numbers
    job = {"name": variant.name, "config": variant.config, "result": str(result_path),
           "score": {"mode": spec.score, "expect": spec.score_expect,
                     "max_new_tokens": spec.score_max_new_tokens}}
    code = run_child([sys.executable, "-m", "lmtune.compare", json.dumps(job)]).returncode
    if code in (130, -signal.SIGINT):  # the child alone was interrupted: stop the comparison too
        raise KeyboardInterrupt
    row: dict[str, Any] = {"name": variant.name, "keys": variant.changes, "left_out": variant.left_out,
                           "finetuning_type": variant.config.get("finetuning_type", "lora")}
    measured = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if code != 0 or "error" in measured:
        return row | {"status": "failed",
                      "error": measured.get("error") or f"the child process exited with code {code}"}
    return row | {"status": "ok"} | _collect(folder, measured)


def _collect(folder: Path, measured: dict[str, Any]) -> dict[str, Any]:
    from lmtune.train.logs import LOG_FILE, read_log
    from lmtune.train.results import RESULTS_FILE

    results = json.loads((folder / RESULTS_FILE).read_text())
    records = read_log(folder / LOG_FILE)
    losses = [[r["step"], r["loss"]] for r in records if "loss" in r]
    gib = 1024 ** 3
    return {
        "trainable_params": results["trainable_params"], "total_params": results["total_params"],
        "trainable_pct": round(100 * results["trainable_params"] / results["total_params"], 4),
        "peak_rss_gib": round(measured["peak_rss_bytes"] / gib, 3),
        "peak_gpu_gib": round(measured["peak_gpu_bytes"] / gib, 3) if "peak_gpu_bytes" in measured
        else None,
        "wall_s": measured["wall_s"], "train_runtime_s": results["train_runtime"],
        "train_tokens_per_second": results["train_tokens_per_second"],
        "final_train_loss": losses[-1][1] if losses else None,
        "mean_train_loss": round(results["train_loss"], 6), "eval_loss": results.get("eval_loss"),
        "score": measured["score"],
        "size_mb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6,
        "steps": results["global_step"], "device": measured["device"],
        "loss_curve": losses,
        "eval_curve": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
    }
