"""The best evaluation of a run: load_best_model_at_end and early_stopping_steps.

Each evaluation is compared with the best so far by metric_for_best_model. With
load_best_model_at_end the trained weights of the best one are kept (in memory, and in
output_dir/best_weights.safetensors so a resumed run still has them) and put back before the run's
output is written; early_stopping_steps ends the run after that many evaluations in a row without
improvement. What is best so far travels in the checkpoint's trainer state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmtune import distributed as dist
from lmtune.config import RunConfig
from lmtune.errors import ConfigError

BEST_WEIGHTS = "best_weights.safetensors"


def metric_name(cfg: RunConfig) -> str:
    name = cfg.metric_for_best_model or "loss"
    return name if name.startswith("eval_") else f"eval_{name}"


class BestEvaluation:
    def __init__(self, cfg: RunConfig, params: list[torch.nn.Parameter], output_dir: Path,
                 state: dict[str, Any]):
        self.metric = metric_name(cfg)
        self.greater = (cfg.greater_is_better if cfg.greater_is_better is not None
                        else not self.metric.endswith("loss"))
        self.keep = cfg.load_best_model_at_end
        self.patience = cfg.early_stopping_steps
        self.params = params
        self.file = output_dir / BEST_WEIGHTS
        self.state = state  # the loop's checkpointed state: best_metric, best_step, evals_no_better
        for key, value in (("best_metric", None), ("best_step", None), ("evals_no_better", 0)):
            state.setdefault(key, value)
        self.weights: list[torch.Tensor] | None = None
        if self.keep and state["best_step"] is not None and self.file.is_file():  # resumed
            saved = load_file(self.file)
            self.weights = [saved[str(i)] for i in range(len(params))]

    @property
    def active(self) -> bool:
        return self.keep or self.patience is not None

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record the evaluation at `step`; True when early stopping ends the run here."""
        if self.metric not in metrics:
            raise ConfigError(f"metric_for_best_model: {self.metric} is not among the evaluation's "
                              f"metrics ({', '.join(sorted(metrics))}).",
                              "name one of them (eval_ may be left out), e.g. metric_for_best_model: "
                              "loss.")
        value, best = metrics[self.metric], self.state["best_metric"]
        if best is None or (value > best if self.greater else value < best):
            self.state.update(best_metric=value, best_step=step, evals_no_better=0)
            if self.keep:
                self.weights = [p.detach().to("cpu", copy=True) for p in self.params]
                dist.on_main(self._save)
            return False
        self.state["evals_no_better"] += 1
        return self.patience is not None and self.state["evals_no_better"] >= self.patience

    def _save(self) -> None:
        assert self.weights is not None  # set just before
        staging = self.file.with_suffix(".tmp")
        save_file({str(i): w.contiguous() for i, w in enumerate(self.weights)}, str(staging))
        os.replace(staging, self.file)

    def restore(self) -> int | None:
        """Put the best evaluation's weights back (load_best_model_at_end); -> its step."""
        if not self.keep or self.weights is None:
            return None
        with torch.no_grad():
            for param, weight in zip(self.params, self.weights):
                param.copy_(weight.to(param.device, param.dtype))
        return self.state["best_step"]

    def clean_up(self) -> None:
        if dist.is_main():
            self.file.unlink(missing_ok=True)
