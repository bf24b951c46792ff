"""trainer_log.jsonl (one JSON line per logged step) and the loss plot drawn from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmtune.durable import write_with
from lmtune.train.trackers import Tracker, log_record

LOG_FILE = "trainer_log.jsonl"
PLOT_FILE = "training_loss.png"


class TrainerLog:
    """Appends one line per logged step and flushes it, so the file is readable while a run goes.
    The same record goes to each of `trackers` (report_to). With `files` false (ranks other than 0)
    it keeps the records in memory only."""

    def __init__(self, output_dir: Path, resume_step: int = 0, trackers: list[Tracker] = (),
                 files: bool = True):
        self.trackers = list(trackers)
        self.path = output_dir / LOG_FILE
        self.records: list[dict[str, Any]] = []
        self.files = files
        if not files:
            return
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
        if not self.files:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        log_record(self.trackers, record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Scores of generated val answers (eval_generate_samples), drawn beside the loss on their own axis.
GENERATION_METRICS = ("eval_bleu-4", "eval_rouge-l")


def plot_loss(records: list[dict[str, Any]], path: Path, title: str, key: str = "loss",
              beside: tuple[str, ...] = ()) -> bool:
    """Train `key` (raw and smoothed) and eval_`key` against step, and any `beside` metrics logged
    on a second y axis. False when nothing to plot."""
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
    handles, labels = ax.get_legend_handles_labels()
    other = [(name, [(r["step"], r[name]) for r in records if name in r]) for name in beside]
    other = [(name, points) for name, points in other if points]
    if other:
        twin = ax.twinx()
        for (name, points), style in zip(other, ("s--", "^--")):
            twin.plot(*zip(*points), style, color="#2a9d4a", label=name)
        twin.set_ylabel("score (0-100)")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels)
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png"), f"the plot {path.name}")
    finally:
        plt.close(fig)
    return True
