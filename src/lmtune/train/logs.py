"""trainer_log.jsonl (one JSON line per logged step) and the loss plot drawn from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG_FILE = "trainer_log.jsonl"
PLOT_FILE = "training_loss.png"


class TrainerLog:
    """Appends one line per logged step and flushes it, so the file is readable while a run goes."""

    def __init__(self, output_dir: Path, resume_step: int = 0):
        self.path = output_dir / LOG_FILE
        self.records: list[dict[str, Any]] = []
        if resume_step and self.path.is_file():
            # A resumed run continues the log from its checkpoint; later lines belonged to the
            # interrupted attempt and are replaced by the steps re-run now.
            kept = [r for r in read_log(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept
        elif self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: Path, title: str, key: str = "loss") -> bool:
    """Train `key` (raw and smoothed) and eval_`key` against step. False when nothing to plot."""
    train = [(r["step"], r[key]) for r in records if key in r]
    evals = [(r["step"], r[f"eval_{key}"]) for r in records if f"eval_{key}" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ab", linewidth=1, label=f"train {key}")
        smoothed, value = [], losses[0]
        for loss in losses:
            value = 0.8 * value + 0.2 * loss
            smoothed.append(value)
        ax.plot(steps, smoothed, color="#1f5fa8", linewidth=2, label=f"train {key} (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#d2642a", label=f"eval {key}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
