"""Experiment trackers (`report_to`): every record trainer_log.jsonl gets, and the run config, also go
to TensorBoard, MLflow, Weights & Biases or SwanLab.

Offline by default, so a run sends nothing anywhere unasked:
- tensorboard: event files in logging_dir/<run_name> (logging_dir defaults to output_dir/runs).
- mlflow: a local store in output_dir/mlruns, unless MLFLOW_TRACKING_URI names another.
- wandb, swanlab: offline run folders in output_dir (wandb/, swanlog/), uploaded later with
  `wandb sync` / `swanlab sync`. They go online only when WANDB_MODE / SWANLAB_MODE say so, or when
  an API key is in the environment (WANDB_API_KEY / SWANLAB_API_KEY) and the service answers.

Each tracker is optional: `pip install 'lmtune[tensorboard]'` (or mlflow, wandb, swanlab).
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from lmtune.config import RunConfig
from lmtune.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow", "wandb", "swanlab")


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def tracker_names(cfg: RunConfig) -> list[str]:
    """The trackers report_to asks for; a ConfigError naming the install command for missing ones.
    'all' means every tracker that is installed, as in transformers."""
    asked = cfg.report_to if isinstance(cfg.report_to, list) else [cfg.report_to]
    if "all" in asked:
        return [name for name in TRACKERS if _installed(name)]
    names = list(dict.fromkeys(name for name in asked if name != "none"))
    missing = [name for name in names if not _installed(name)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"report_to: {', '.join(missing)} {verb} not installed.",
                          f"pip install {' '.join(repr(f'lmtune[{n}]') for n in missing)}, or take "
                          f"{', '.join(missing)} out of report_to.")
    return names


def metric_name(key: str) -> str:
    """trainer_log.jsonl's `eval_loss` / `loss` as `eval/loss` / `train/loss`: the groups that
    transformers' tracker callbacks use, so dashboards read like a LLaMA-Factory run's."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def _online(mode_env: str, key_env: str, host: str, port: int = 443) -> str | None:
    """The mode to pass: None where the user set it in `mode_env` (the tool reads it), else online
    only with an API key in the environment and the service reachable; offline otherwise."""
    if os.environ.get(mode_env):
        return None
    if not os.environ.get(key_env):
        return "offline"
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


class TensorBoard:
    def __init__(self, folder: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("run_config", f"```yaml\n{yaml.safe_dump(config, sort_keys=False)}```")
        print(f"tensorboard: {folder} (view with `tensorboard --logdir {folder.parent}`)")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # readable while the run goes, like trainer_log.jsonl

    def close(self) -> None:
        self.writer.close()


class MLflow:
    # MLflow caps one batch at 100 params and a param value at 6000 characters.
    _BATCH, _VALUE_CHARS = 100, 6000

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output_dir / "mlruns").resolve().as_uri()
            # MLflow 3 keeps its file store but refuses it unless asked: the database store it
            # prefers needs the full mlflow package (SQLAlchemy); the file store works with
            # mlflow-skinny and `mlflow ui --backend-store-uri <output_dir>/mlruns` reads it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lmtune")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[: self._VALUE_CHARS]) for k, v in config.items()]
        for start in range(0, len(params), self._BATCH):
            self.client.log_batch(self.run_id, params=params[start: start + self._BATCH])
        print(f"mlflow: run {self.run_id} in {uri}")

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmtune"), name=run_name,
                              config=config, dir=str(output_dir),
                              mode=_online("WANDB_MODE", "WANDB_API_KEY", "api.wandb.ai"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class SwanLab:
    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any]):
        import swanlab

        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJ_NAME", "lmtune"), name=run_name,
                                config=config, log_dir=str(output_dir / "swanlog"),
                                mode=_online("SWANLAB_MODE", "SWANLAB_API_KEY", "api.swanlab.cn"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: RunConfig, output_dir: Path) -> list[Tracker]:
    """Start a run in each tracker report_to names, with the run config attached."""
    names = tracker_names(cfg)
    run_name = cfg.run_name or output_dir.resolve().name
    config = cfg.to_yaml_dict()
    opened: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            folder = Path(cfg.logging_dir) if cfg.logging_dir else output_dir / "runs"
            opened.append(TensorBoard(folder / run_name, config))
        else:
            opened.append({"mlflow": MLflow, "wandb": WandB, "swanlab": SwanLab}[name](
                output_dir, run_name, config))
    return opened


def log_record(trackers: list[Tracker], record: dict[str, Any]) -> None:
    """One trainer_log.jsonl record to every tracker: its numbers, at its step."""
    metrics = {metric_name(k): float(v) for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v)}
    for tracker in trackers:
        tracker.log(metrics, record["step"])
