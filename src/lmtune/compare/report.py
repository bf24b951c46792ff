"""The comparison's report: compare.md (one table, the sweeps, how each number is measured),
compare.json (every row and sweep point, curves included) and compare.png (loss curves, peak memory,
speed and, with eval_task, benchmark accuracy side by side)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmtune.compare.spec import REPORT_JSON, REPORT_MD, REPORT_PNG, CompareSpec
from lmtune.durable import write_file, write_with


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _score_cell(row: dict[str, Any]) -> str:
    score = row["score"]
    return f"{score['hits']}/{score['total']}" if score["total"] else "-"


def _benchmark_cell(row: dict[str, Any]) -> str:
    bench = row.get("benchmark")
    if not bench:
        return "-"
    delta = bench.get("delta")
    return f"{bench['accuracy']:.1f}" + ("" if delta is None else f" ({delta:+.1f})")


def _variant_cell(row: dict[str, Any]) -> str:
    sweep = row.get("sweep")
    if not sweep or not sweep["best"]:
        return row["name"]
    return f"{row['name']} ({sweep['best']}, best of {len(sweep['points'])})"


def _memory(row: dict[str, Any]) -> float:
    return row["peak_gpu_gib"] if row["peak_gpu_gib"] is not None else row["peak_rss_gib"]


def _base_lines(spec: CompareSpec, bases: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for model, base in bases.items():
        lines.append(f"Base model {model} on {spec.eval_task} ({spec.n_shot}-shot): "
                     + (f"failed: {base['error'].splitlines()[0]}" if "error" in base else
                        f"{base['accuracy']:.1f}% of {base['questions']} questions."))
    return lines + [""]


def _sweep_lines(rows: list[dict[str, Any]]) -> list[str]:
    swept = [r for r in rows if r.get("sweep")]
    if not swept:
        return []
    bench = any(p.get("benchmark") for r in swept for p in r["sweep"]["points"])
    lines = ["", "Sweeps (each point trained on its own; the table shows the best: highest task "
             "score, then lowest eval loss):", "",
             "| variant | point | task score | eval loss | final train loss "
             + ("| benchmark % |" if bench else "|"),
             "| --- | --- | ---: | ---: | ---: |" + (" ---: |" if bench else "")]
    for r in swept:
        for point in r["sweep"]["points"]:
            mark = " (best)" if point["label"] == r["sweep"]["best"] else ""
            if point["status"] != "ok":
                cells = [f"failed: {point['error'].splitlines()[0]}", "", ""]
            else:
                cells = [_score_cell(point), _cell(point["eval_loss"], 4),
                         _cell(point["final_train_loss"], 4)]
            cells += [_benchmark_cell(point)] if bench else []
            lines.append(" | ".join([f"| {r['name']}", point["label"] + mark, *cells]) + " |")
    return lines


def markdown(path: str, spec: CompareSpec, rows: list[dict[str, Any]],
             bases: dict[str, dict[str, Any]] | None = None) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    gpu = any(r["peak_gpu_gib"] is not None for r in ok)
    memory = "peak GPU GiB" if gpu else "peak RSS GiB"
    bench = bool(spec.eval_task)
    trainings = sum(len(r["sweep"]["points"]) if r.get("sweep") else 1 for r in rows)
    lines = [f"# lmtune compare: {path}", "",
             f"Base: {spec.base_config or 'no base_config'}"
             + (f" with {', '.join(f'{k}: {v}' for k, v in spec.base.items())}" if spec.base else "")
             + f". {len(rows)} variants"
             + (f" ({trainings} trainings with the sweeps)" if trainings > len(rows) else "")
             + ", one after another, each in its own process"
             + (f", on {ok[0]['device']}." if ok else "."), "",
             *(_base_lines(spec, bases or {}) if bench else []),
             f"| variant | method | trainable params | trainable % | {memory} | wall s | train tokens/s "
             "| final train loss | eval loss | task score | "
             + ("benchmark % (vs base) | " if bench else "") + "size MB |",
             "| --- | --- |" + " ---: |" * (10 if bench else 9)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {_variant_cell(r)} | {r['finetuning_type']} | failed: "
                         f"{r['error'].splitlines()[0]} |" + " |" * (8 if bench else 7))
            continue
        lines.append(" | ".join([
            f"| {_variant_cell(r)}", r["finetuning_type"], _cell(r["trainable_params"]),
            _cell(r["trainable_pct"], 2), _cell(_memory(r), 2), _cell(r["wall_s"], 1),
            _cell(r["train_tokens_per_second"], 1), _cell(r["final_train_loss"], 4),
            _cell(r["eval_loss"], 4), _score_cell(r), *([_benchmark_cell(r)] if bench else []),
            f"{r['size_mb']:.3g}"]) + " |")
    scored = next((r["score"] for r in ok if r["score"]["total"]), None)
    how = ("answers equal to the reference reply (whitespace aside)" if spec.score == "exact" else
           f"answers that contain \"{scored['expect'] if scored else spec.score_expect}\", among the "
           "val rows whose reference reply contains it")
    lines += ["", "Variants (keys over the base):"]
    lines += [f"- {r['name']}: " + (", ".join(f"{k}: {v}" for k, v in r["keys"].items()) or "the base")
              + (f" (base keys left out: {', '.join(r['left_out'])})" if r["left_out"] else "")
              + (f"; swept {', '.join(f'{k} over {vs}' for k, vs in r['sweep']['keys'].items())}, "
                 f"best {r['sweep']['best'] or 'none (every point failed)'}" if r.get("sweep") else "")
              for r in rows]
    lines += _sweep_lines(rows)
    lines += ["", "How each number is measured:",
              f"- {memory}: " + ("torch's peak allocated GPU memory in the variant's process."
                                 if gpu else "the variant process's peak resident set size, Python "
                                 "and the libraries included (the same for every variant)."),
              "- wall s: loading, encoding, training and saving, in the variant's process; train "
              "tokens/s: non-padding tokens per second of the training loop.",
              "- final train loss: the last logged window; eval loss: on the val split after training.",
              f"- task score: {how}; greedy answers (at most {spec.score_max_new_tokens} new tokens) "
              "of the saved output, loaded as `lmtune chat` loads it (a quantized run's adapter on "
              "the full-precision base; weight adapters merged into it).",
              *([f"- benchmark %: accuracy on {spec.eval_task} ({spec.n_shot}-shot, the choice "
                 "letter with the highest next-token logit, as `lmtune eval` scores it) of the same "
                 "loaded output; in brackets its change against the base model, in percentage "
                 "points (below zero: forgotten)."] if bench else []),
              "- size MB: the saved weights (adapter or whole model), safetensors."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, bases: dict[str, dict[str, Any]] | None = None) -> None:
    """Train loss curves overlaid (each variant's best sweep point); bars for peak memory, training
    speed and, when measured, benchmark accuracy with the base model's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    bench = [r for r in ok if r.get("benchmark")]
    panels = 4 if bench else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.3 * panels, 4.8), dpi=110,
                             gridspec_kw={"width_ratios": [1.6] + [1] * (panels - 1)})
    loss_ax, mem_ax, speed_ax = axes[:3]
    for r in ok:
        if r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            loss_ax.plot(steps, losses, linewidth=1.6, label=r["name"])
    loss_ax.set(xlabel="step", ylabel="train loss", title="train loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    names = [r["name"] for r in ok]
    for ax, values, title in ((mem_ax, [_memory(r) for r in ok], "peak memory (GiB)"),
                              (speed_ax, [r["train_tokens_per_second"] for r in ok],
                               "train tokens/s")):
        bars = ax.bar(names, values, color="#3b7dd8")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(axis="y", alpha=0.3)
    if bench:
        bench_ax = axes[3]
        bars = bench_ax.bar([r["name"] for r in bench], [r["benchmark"]["accuracy"] for r in bench],
                            color="#d8843b")
        bench_ax.bar_label(bars, fmt="%.1f", fontsize=8)
        for base in (bases or {}).values():
            if "accuracy" in base:
                bench_ax.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1,
                                 label=f"base {base['accuracy']:.1f}")
        bench_ax.set(title=f"{bench[0]['benchmark']['task']} accuracy (%)", ylim=(0, 100))
        bench_ax.tick_params(axis="x", labelrotation=45)
        bench_ax.grid(axis="y", alpha=0.3)
        bench_ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png"), f"the plot {path.name}")
    finally:
        plt.close(fig)


def write_report(path: str, spec: CompareSpec, rows: list[dict[str, Any]],
                 bases: dict[str, dict[str, Any]] | None = None) -> Path:
    """The three files in spec.output_dir; returns compare.md. `bases`: the benchmark accuracy of
    each model the variants start from (eval_task)."""
    out = Path(spec.output_dir)
    write_file(out / REPORT_JSON, json.dumps({"spec": spec.model_dump(), "base_models": bases or {},
                                              "variants": rows}, indent=2),
               "the comparison's JSON")
    write_file(out / REPORT_MD, markdown(path, spec, rows, bases), "the comparison's report")
    plot(rows, out / REPORT_PNG, bases)
    return out / REPORT_MD
