"""One variant, trained in a child process of its own (so the peak memory measured is its own),
measured and scored there; the parent collects what it wrote and the run's own result files."""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lmtune.compare.spec import BASE_EVAL, EVAL_KEYS, CompareSpec, Variant
from lmtune.config import build_config
from lmtune.errors import LmtuneError
from lmtune.measure import device_name, peak_rss_bytes, run_child

RESULT_FILE = "compare_variant.json"  # what a child measured, in its variant's folder


def child_main(job_json: str) -> int:
    """`python -m lmtune.compare JOB`: train one variant, measure it, score it; or, for a job of kind
    base, only ask the base model the benchmark's questions."""
    from lmtune.compare.scoring import benchmark_accuracy, task_score, trained_session
    from lmtune.runtime import configure
    from lmtune.train import STAGES

    configure()
    job = json.loads(job_json)
    result_path = Path(job["result"])
    try:
        cfg = build_config(job["config"], source=f"variant {job['name']}")
        if job.get("kind") == "base":
            from lmtune.infer.chat import ChatSession

            base = ChatSession.load(cfg, cfg.model_name_or_path, cfg.adapter_paths)
            measured: dict[str, Any] = {"benchmark": benchmark_accuracy(cfg, base, job["name"],
                                                                        job["eval"])}
        else:
            start = time.perf_counter()
            STAGES[cfg.stage](cfg)
            # Measured before scoring: the peak is the training's, not the answering's.
            measured = {"wall_s": round(time.perf_counter() - start, 2),
                        "peak_rss_bytes": peak_rss_bytes(), "device": device_name()}
            import torch

            if torch.cuda.is_available():
                measured["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            # One load of the saved output serves the task score and the benchmark.
            session = functools.cache(lambda: trained_session(cfg, job["max_new_tokens"]))
            measured["score"] = task_score(cfg, **job["score"], session=session)
            if job.get("eval"):
                measured["benchmark"] = benchmark_accuracy(cfg, session(), job["name"], job["eval"])
    except LmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps({"error": str(exc)}))
        return 2
    result_path.write_text(json.dumps(measured, indent=2))
    return 0


def eval_keys(spec: CompareSpec) -> dict[str, Any] | None:
    """What `lmtune eval` would read for the spec's eval_task; None without one."""
    if not spec.eval_task:
        return None
    return {"task": spec.eval_task} | {k: getattr(spec, k) for k in EVAL_KEYS}


def _child(job: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    result_path = Path(job["result"])
    result_path.unlink(missing_ok=True)  # never report an earlier run's numbers
    code = run_child([sys.executable, "-m", "lmtune.compare", json.dumps(job)]).returncode
    if code in (130, -signal.SIGINT):  # the child alone was interrupted: stop the comparison too
        raise KeyboardInterrupt
    return code, json.loads(result_path.read_text()) if result_path.is_file() else {}


def run_base_eval(config: dict[str, Any], spec: CompareSpec, label: str) -> dict[str, Any]:
    """The benchmark accuracy of the model a variant starts from (`config`'s model and adapters),
    in a child process as the variants are; {"error": ...} when it failed."""
    result = Path(spec.output_dir) / BASE_EVAL
    code, measured = _child({"kind": "base", "name": label, "config": config,
                             "result": str(result), "eval": eval_keys(spec)})
    result.unlink(missing_ok=True)  # its numbers live on in compare.json
    if code != 0 or "error" in measured:
        return {"error": measured.get("error") or f"the child process exited with code {code}"}
    return measured["benchmark"]


def run_variant(name: str, config: dict[str, Any], spec: CompareSpec) -> dict[str, Any]:
    """Train one config (a variant, or one point of its sweep) in a child; its row."""
    folder = Path(config["output_dir"])
    code, measured = _child({
        "name": name, "config": config, "result": str(folder / RESULT_FILE),
        "score": {"mode": spec.score, "expect": spec.score_expect},
        "max_new_tokens": spec.score_max_new_tokens, "eval": eval_keys(spec)})
    row: dict[str, Any] = {"finetuning_type": config.get("finetuning_type", "lora")}
    if code != 0 or "error" in measured:
        return row | {"status": "failed",
                      "error": measured.get("error") or f"the child process exited with code {code}"}
    return row | {"status": "ok"} | _collect(folder, measured)


def _rank(row: dict[str, Any]) -> tuple[float, float, float]:
    """Sort key of a sweep point, best first: the task score, then the eval loss, then the train loss."""
    score = row["score"]
    inf = float("inf")
    return (-score["hits"] / score["total"] if score["total"] else 0.0,
            inf if row["eval_loss"] is None else row["eval_loss"],
            inf if row["final_train_loss"] is None else row["final_train_loss"])


def run_compared(variant: Variant, spec: CompareSpec,
                 announce: Callable[[str], None]) -> dict[str, Any]:
    """The variant's row in the table: its one run, or its best sweep point, with every point kept."""
    head = {"name": variant.name, "keys": variant.changes, "left_out": variant.left_out}
    if not variant.points:
        announce(variant.name)
        return head | run_variant(variant.name, variant.config, spec)
    points = []
    for i, point in enumerate(variant.points, 1):
        announce(f"{variant.name} {point.label} (sweep {i}/{len(variant.points)})")
        points.append({"label": point.label, "values": point.values}
                      | run_variant(f"{variant.name} {point.label}", point.config, spec))
    ok = [p for p in points if p["status"] == "ok"]
    sweep = {"keys": variant.sweep, "points": points, "best": None}
    if not ok:
        return head | {"finetuning_type": points[0]["finetuning_type"], "status": "failed",
                       "error": "every sweep point failed; the first: " + points[0]["error"],
                       "sweep": sweep}
    best = min(ok, key=_rank)
    sweep["best"] = best["label"]
    row = {k: v for k, v in best.items() if k not in ("label", "values")}
    return head | {"keys": variant.changes | best["values"]} | row | {"sweep": sweep}


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
        "score": measured["score"], "benchmark": measured.get("benchmark"),
        "size_mb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6,
        "steps": results["global_step"], "device": measured["device"],
        "loss_curve": losses,
        "eval_curve": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
    }
