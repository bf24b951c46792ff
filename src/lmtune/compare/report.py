"""The comparison's report: compare.md (one table, how each number is measured), compare.json (every
row, curves included) and compare.png (loss curves, peak memory and speed side by side)."""

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


def _memory(row: dict[str, Any]) -> float:
    return row["peak_gpu_gib"] if row["peak_gpu_gib"] is not None else row["peak_rss_gib"]


def markdown(path: str, spec: CompareSpec, rows: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    gpu = any(r["peak_gpu_gib"] is not None for r in ok)
    memory = "peak GPU GiB" if gpu else "peak RSS GiB"
    lines = [f"# lmtune compare: {path}", "",
             f"Base: {spec.base_config or 'no base_config'}"
             + (f" with {', '.join(f'{k}: {v}' for k, v in spec.base.items())}" if spec.base else "")
             + f". {len(rows)} variants, one after another, each in its own process"
             + (f", on {ok[0]['device']}." if ok else "."), "",
             f"| variant | method | trainable params | trainable % | {memory} | wall s | train tokens/s "
             "| final train loss | eval loss | task score | size MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['finetuning_type']} | failed: {r['error'].splitlines()[0]} "
                         "| | | | | | | | |")
            continue
        lines.append(" | ".join([
            f"| {r['name']}", r["finetuning_type"], _cell(r["trainable_params"]),
            _cell(r["trainable_pct"], 2), _cell(_memory(r), 2), _cell(r["wall_s"], 1),
            _cell(r["train_tokens_per_second"], 1), _cell(r["final_train_loss"], 4),
            _cell(r["eval_loss"], 4), _score_cell(r), f"{r['size_mb']:.3g}"]) + " |")
    scored = next((r["score"] for r in ok if r["score"]["total"]), None)
    how = ("answers equal to the reference reply (whitespace aside)" if spec.score == "exact" else
           f"answers that contain \"{scored['expect'] if scored else spec.score_expect}\", among the "
           "val rows whose reference reply contains it")
    lines += ["", "Variants (keys over the base):"]
    lines += [f"- {r['name']}: " + (", ".join(f"{k}: {v}" for k, v in r["keys"].items()) or "the base")
              + (f" (base keys left out: {', '.join(r['left_out'])})" if r["left_out"] else "")
              for r in rows]
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
              "- size MB: the saved weights (adapter or whole model), safetensors."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Train loss curves overlaid; bars for peak memory and training speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (loss_ax, mem_ax, speed_ax) = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110,
                                                    gridspec_kw={"width_ratios": [1.6, 1, 1]})
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
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png"), f"the plot {path.name}")
    finally:
        plt.close(fig)


def write_report(path: str, spec: CompareSpec, rows: list[dict[str, Any]]) -> Path:
    """The three files in spec.output_dir; returns compare.md."""
    out = Path(spec.output_dir)
    write_file(out / REPORT_JSON, json.dumps({"spec": spec.model_dump(), "variants": rows}, indent=2),
               "the comparison's JSON")
    write_file(out / REPORT_MD, markdown(path, spec, rows), "the comparison's report")
    plot(rows, out / REPORT_PNG)
    return out / REPORT_MD
