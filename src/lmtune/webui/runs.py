"""Training runs started from the web UI.

Each run has a folder under the runs root (relative to the working folder, like every path in a
YAML): `train.yaml` (what it runs, written from the form), `console.log` (what the run printed),
`status.json` (its command and exit code) and `output/` (its output_dir). Training is
`python -m lmtune.cli train train.yaml` in a child process: the same command a user would type, so
the YAML shown in the page is the whole run. Stop sends SIGINT, which the training loop turns into a
checkpoint and exit code 130; resume runs the same YAML with resume_from_checkpoint=auto.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any

import yaml

import lmtune
from lmtune.config import RunConfig, build_config, check_training_inputs, keys_for_other_methods
from lmtune.errors import ConfigError
from lmtune.train.checkpoint import complete_checkpoints
from lmtune.train.logs import LOG_FILE, PLOT_FILE, read_log
from lmtune.train.results import RESULTS_FILE

CONFIG_FILE, CONSOLE_FILE, STATUS_FILE, OUTPUT = "train.yaml", "console.log", "status.json", "output"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# tqdm's bar in the console: "train:  40%|####      | 4/10 [00:01<00:02, ...]"
_PROGRESS = re.compile(r"train:.*?(\d+)/(\d+) \[")

# The keys the form shows, in its order; any other key goes in the form's "more keys" YAML.
FORM_KEYS = ("model_name_or_path", "stage", "finetuning_type", "dataset_dir", "dataset", "template",
             "cutoff_len", "max_samples", "val_size", "lora_rank", "lora_target",
             "freeze_trainable_layers", "learning_rate", "num_train_epochs", "max_steps",
             "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
             "warmup_ratio", "bf16", "logging_steps", "save_steps", "seed")


def field_spec(name: str) -> dict[str, Any]:
    """What the page needs to draw one key's input: kind, choices, default and the key's doc."""
    field = RunConfig.model_fields[name]
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    base = args[0] if optional and len(args) == 1 else annotation
    if typing.get_origin(base) is typing.Literal:
        kind, choices = "choice", list(typing.get_args(base))
    else:
        kind = {bool: "bool", int: "int", float: "float"}.get(base, "text")
        choices = None
    default = field.get_default(call_default_factory=True)
    return {"key": name, "kind": kind, "choices": choices, "default": default,
            "doc": field.description, "methods": _method_of(name)}


def _method_of(key: str) -> list[str] | None:
    """The finetuning_types a method key belongs to (None: every method); the page hides the others."""
    types_ = typing.get_args(RunConfig.model_fields["finetuning_type"].annotation)
    owners = [t for t in types_ if key not in keys_for_other_methods(t)]
    return None if len(owners) == len(types_) else owners


def lmtune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmtune.cli", *args]


def child_env() -> dict[str, str]:
    """The environment of a child lmtune: it imports the lmtune this server runs, installed or
    not, and prints unbuffered so the page sees its progress as it happens."""
    source = str(Path(lmtune.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"run name {name!r} cannot name a folder.",
                          "use letters, digits, '.', '_' or '-' (at most 64), starting with a letter "
                          "or digit.")
    return name


def parse_extra(text: str) -> dict[str, Any]:
    """The form's "more keys": YAML text holding one mapping of key: value."""
    try:
        extra = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"more keys: not valid YAML: {getattr(exc, 'problem', exc)}",
                          "write one key per line, e.g. `lora_dropout: 0.05`.") from None
    if not isinstance(extra, dict):
        raise ConfigError("more keys: not a mapping of key: value.",
                          "write one key per line, e.g. `lora_dropout: 0.05`.")
    return extra


def read_dataset_names(dataset_dir: str) -> list[str]:
    """The names dataset_info.json registers in dataset_dir; none when it is absent or unreadable
    (the form then takes file paths, and plan names what is wrong)."""
    try:
        info = json.loads((Path(dataset_dir) / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return sorted(info) if isinstance(info, dict) else []


class Runs:
    """The run folders under `root` and the one training process this web UI may have going.

    One at a time: two trainings on the same CPU or GPU slow each other down several-fold."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def output_dir(self, name: str) -> Path:
        return self.folder(name) / OUTPUT

    def compose(self, name: str, form: dict[str, Any], extra_yaml: str = "") -> dict[str, Any]:
        """The run's keys from the form and the extra YAML, checked as `lmtune train` checks them."""
        self.folder(name)
        unknown = sorted(set(form) - set(FORM_KEYS))
        if unknown:
            raise ConfigError(f"the form has no key {unknown[0]!r}.", "put it in the more keys box.")
        method = form.get("finetuning_type", RunConfig.model_fields["finetuning_type"].default)
        hidden = keys_for_other_methods(method)  # the page hides them; what they hold is moot
        values = {k: v for k, v in form.items() if v not in (None, "") and k not in hidden}
        extra = parse_extra(extra_yaml)
        for key in extra:
            if key in values:
                raise ConfigError(f"more keys: {key} is set in the form as well.",
                                  "keep it in one place.")
            if key == "output_dir":
                raise ConfigError("more keys: output_dir is chosen by the web UI (the run's folder).",
                                  "remove it; the run writes into "
                                  f"{self.output_dir(name).as_posix()}.")
        values |= extra
        values["output_dir"] = self.output_dir(name).as_posix()
        cfg = build_config(values, source="the form")
        check_training_inputs(cfg)
        return values

    def write_config(self, name: str, values: dict[str, Any]) -> Path:
        if self.running() == name:
            raise ConfigError(f"run {name} is training.", "stop it first.")
        folder = self.folder(name)
        output = folder / OUTPUT
        if output.is_dir() and any(output.iterdir()):
            raise ConfigError(f"a run named {name} has trained already ({output}).",
                              "choose another run name, or resume that run.")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_FILE
        header = f"# written by lmtune webui; run it with: lmtune train {path.as_posix()}\n"
        path.write_text(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True),
                        encoding="utf-8")
        return path

    def running(self) -> str | None:
        with self._lock:
            return next((n for n, p in self._procs.items() if p.poll() is None), None)

    def start(self, name: str, overrides: tuple[str, ...] = ()) -> None:
        """`lmtune train train.yaml [overrides]` in a child process, its output in console.log."""
        folder = self.folder(name)
        config = folder / CONFIG_FILE
        if not config.is_file():
            raise ConfigError(f"run {name} has no {CONFIG_FILE}.", "start it from the form.")
        with self._lock:
            busy = next((n for n, p in self._procs.items() if p.poll() is None), None)
            if busy is not None:
                raise ConfigError(f"run {busy} is training; one run trains at a time.",
                                  "wait for it or stop it.")
            command = lmtune_command("train", config.as_posix(), *overrides)
            with open(folder / CONSOLE_FILE, "a", encoding="utf-8") as console:
                console.write(f"$ lmtune train {config.as_posix()} {' '.join(overrides)}\n")
                console.flush()
                proc = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=child_env())
            self._procs[name] = proc
            self._write_status(name, {"state": "running", "pid": proc.pid, "started": time.time(),
                                      "overrides": list(overrides)})
        threading.Thread(target=self._wait, args=(name, proc), daemon=True).start()

    def _wait(self, name: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        status = self._read_status(name)
        self._write_status(name, status | {"state": "ended", "returncode": code, "ended": time.time()})

    def stop(self, name: str) -> None:
        """SIGINT: the run finishes its step, saves checkpoint-N and exits with 130."""
        with self._lock:
            proc = self._procs.get(check_name(name))
        if proc is None or proc.poll() is not None:
            raise ConfigError(f"run {name} is not training.", "nothing to stop.")
        proc.send_signal(signal.SIGINT)

    def resume(self, name: str) -> None:
        if not complete_checkpoints(self.output_dir(name)):
            raise ConfigError(f"run {name} has no complete checkpoint to resume from.",
                              "start it again under a new name.")
        self.start(name, ("resume_from_checkpoint=auto",))

    def _read_status(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.folder(name) / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _write_status(self, name: str, status: dict[str, Any]) -> None:
        path = self.folder(name) / STATUS_FILE
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(status))
        os.replace(staged, path)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        folders = [p for p in self.root.iterdir()
                   if _NAME.match(p.name) and (p / CONFIG_FILE).is_file()]
        return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]

    def _exit(self, name: str) -> tuple[bool, int | None]:
        """(started, exit code): (True, None) while it runs or when the web UI restarted during it."""
        with self._lock:
            proc = self._procs.get(name)
        if proc is not None:  # the process itself: status.json lags behind it by a moment
            return True, proc.poll()
        status = self._read_status(name)
        return bool(status), status.get("returncode")

    def state(self, name: str) -> str:
        """running | finished | stopped | failed | written (never started) | lost (the web UI
        restarted while it ran)."""
        started, code = self._exit(name)
        if not started:
            return "written"
        if code is None:
            with self._lock:
                return "running" if name in self._procs else "lost"
        return "finished" if code == 0 else "stopped" if code == 130 else "failed"

    def summary(self, name: str) -> dict[str, Any]:
        if not (self.folder(name) / CONFIG_FILE).is_file():
            raise ConfigError(f"no run named {name}.", "start one from the form.")
        output = self.output_dir(name)
        state = self.state(name)
        trained = (output / "adapter_config.json").is_file() or (output / "config.json").is_file()
        return {"name": name, "state": state, "chat": state == "finished" and trained,
                "resumable": state in ("stopped", "failed", "lost") and bool(complete_checkpoints(output))}

    def details(self, name: str) -> dict[str, Any]:
        """Everything the page shows of a run: state, progress, the log, console tail, YAML."""
        summary = self.summary(name)
        folder, output = self.folder(name), self.output_dir(name)
        console = _tail(folder / CONSOLE_FILE)
        progress = _PROGRESS.findall(console)
        log_path = output / LOG_FILE
        records = read_log(log_path) if log_path.is_file() else []
        results_path = output / RESULTS_FILE
        return summary | {
            "yaml": (folder / CONFIG_FILE).read_text(encoding="utf-8"),
            "config_path": (folder / CONFIG_FILE).as_posix(), "output_dir": output.as_posix(),
            "returncode": self._exit(name)[1],
            "progress": [int(n) for n in progress[-1]] if progress else None,
            "log": records, "console": console.splitlines()[-40:],
            "plot": (output / PLOT_FILE).is_file(),
            "checkpoints": [p.name for p in complete_checkpoints(output)],
            "results": json.loads(results_path.read_text()) if results_path.is_file() else None,
        }


def _tail(path: Path, size: int = 65536) -> str:
    """The end of a console log as lines: tqdm's carriage-return redraws become lines of their own."""
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(line for line in re.split(r"[\r\n]+", text) if line.strip())
