"""What a config loads, and which weights an adapter belongs on.

An adapter holds changes to the weights it was trained on; on any other weights, the same base
merged with it included, it computes garbage without an error. So every adapter lmtune saves
carries a record of its base (BASE_RECORD): the base's folder or hub id, a fingerprint of its
weights, and the adapters that were merged into them before training (in order, by fingerprint).
An export records the same for the merged folder (EXPORT_RECORD), the adapters it merged added.
Before an adapter goes on a model, `check_adapter` compares the two and refuses with the reason.

The fingerprint is a hash over every tensor's name, shape and three of its rows (first, middle,
last) as float32, read from the safetensors files: milliseconds for any model size, the same for a
bf16 folder and its fp32 copy, and different once anything is merged into the weights (a merged
adapter changes every row of the layers it targets).

An adapter without the record (from peft directly, or saved before lmtune wrote one) is checked
by what peft stores: its adapter_config.json's base_model_name_or_path, when that names weights on
this machine, must have the fingerprint of the model it goes on. Adapters merged in between are not
checked for such an adapter: stacking adapters trained apart is how LLaMA-Factory uses several.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtune.config import RunConfig
from lmtune.errors import ModelError

BASE_RECORD = "lmtune_base.json"  # in an adapter folder: the weights it was trained on
EXPORT_RECORD = "lmtune_export.json"  # in an export folder: what was merged into what
_ATTRIBUTE = "lmtune_lineage"  # on a loaded model: its lineage, once known or changed by a merge


# --- what a config loads ----------------------------------------------------------------------------

def trained_output(cfg: RunConfig) -> tuple[str | None, list[str]]:
    """What a finished run in cfg.output_dir offers: (full model folder or None, adapter folders)."""
    if not cfg.output_dir:
        return None, []
    from lmtune.train.checkpoint import require_complete_output  # train imports models

    out = Path(cfg.output_dir)
    require_complete_output(out)
    if (out / "adapter_config.json").is_file():
        return None, [str(out)]
    if (out / "config.json").is_file():
        return str(out), []
    return None, []


def weights_of(cfg: RunConfig, use_trained: bool = True) -> tuple[str, list[str]]:
    """(model, adapters) that chat, export, serve and eval load for `cfg`: adapter_name_or_path when
    it is given; none when the command line gives it as null (`adapter_name_or_path=null`);
    otherwise, with `use_trained`, what a finished run left in output_dir."""
    if cfg.adapter_paths or cfg.null_on_command_line("adapter_name_or_path") or not use_trained:
        return cfg.model_name_or_path, cfg.adapter_paths
    full, adapters = trained_output(cfg)
    return full or cfg.model_name_or_path, adapters


def run_output(cfg: RunConfig) -> tuple[str, list[str]]:
    """(model, adapters) that compute what the run of `cfg` trained: a full model folder, or the
    base with the adapters merged before training and the trained adapter last."""
    full, adapters = trained_output(cfg)
    if full:
        return full, []
    beneath = cfg.adapter_paths if cfg.create_new_adapter else cfg.adapter_paths[:-1]
    return cfg.model_name_or_path, beneath + adapters


# --- fingerprints -----------------------------------------------------------------------------------

def _weights_folder(name: str) -> Path | None:
    folder = Path(name)
    if folder.is_dir():
        return folder
    try:  # a hub id: its files in the local HF cache, if they are there
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a hub id at all: nothing to fingerprint
        return None


def weights_fingerprint(name: str) -> str | None:
    """A fingerprint of the safetensors weights of a model folder or cached hub id (None: none
    found)."""
    from safetensors import safe_open

    folder = _weights_folder(name)
    files = sorted(folder.glob("*.safetensors")) if folder else []
    if not files:
        return None
    samples: dict[str, bytes] = {}  # by name, so how the weights are sharded does not matter
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shape = tensor.get_shape()
                if len(shape) < 2:
                    sample = f.get_tensor(key)
                else:
                    rows = sorted({0, shape[0] // 2, shape[0] - 1})
                    sample = torch.cat([tensor[i: i + 1] for i in rows])
                if sample.is_floating_point():
                    sample = sample.float()
                samples[key] = f"{key}{list(shape)}".encode() + \
                    sample.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    digest = hashlib.sha256()
    for key in sorted(samples):
        digest.update(samples[key])
    return digest.hexdigest()[:16]


def adapter_fingerprint(folder: str) -> str:
    """A fingerprint of an adapter's weights file: copies of one adapter share it."""
    digest = hashlib.sha256()
    with open(Path(folder) / "adapter_model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# --- lineage ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lineage:
    """Weights as the base they started from plus the adapters merged into them, in order."""

    base: str  # folder or hub id
    fingerprint: str | None  # of the base's weights; None: its files were not found
    merged: tuple[tuple[str, str], ...] = ()  # (adapter folder, adapter fingerprint)

    def same_weights(self, other: Lineage) -> bool:
        return (self.fingerprint == other.fingerprint
                and [fp for _, fp in self.merged] == [fp for _, fp in other.merged])

    def merging(self, adapter: str) -> Lineage:
        return Lineage(self.base, self.fingerprint, self.merged + ((adapter, adapter_fingerprint(adapter)),))

    def describe(self) -> str:
        text = f"{self.base} (weights fingerprint {self.fingerprint or 'unknown'})"
        return text + "".join(f" + merged adapter {path}" for path, _ in self.merged)

    def to_json(self) -> dict[str, Any]:
        return {"base_model_name_or_path": self.base, "base_fingerprint": self.fingerprint,
                "merged_adapters": [{"path": p, "fingerprint": fp} for p, fp in self.merged]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lineage:
        return cls(data["base_model_name_or_path"], data["base_fingerprint"],
                   tuple((m["path"], m["fingerprint"]) for m in data["merged_adapters"]))


def _read_record(path: Path, key: str | None = None) -> Lineage | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Lineage.from_json(data[key] if key else data)
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{path} is not a record lmtune can read.",
                         f"restore it from where the folder came from, or delete {path.name} to "
                         "load the folder unchecked.") from None


def folder_lineage(name: str) -> Lineage:
    """The lineage of the weights in a model folder or hub id: an export's record, else the
    folder's own weights with nothing merged."""
    record = _read_record(Path(name) / EXPORT_RECORD, "lineage")
    return record or Lineage(name, weights_fingerprint(name))


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel

    from lmtune.models.scalar_head import ScalarHeadModel

    if isinstance(model, ScalarHeadModel):
        model = model.lm
    return model.get_base_model() if isinstance(model, PeftModel) else model


def lineage_of(model: torch.nn.Module) -> Lineage:
    """The lineage of a loaded model's base weights (adapters merged in this process included)."""
    base = _base_model(model)
    known = getattr(base, _ATTRIBUTE, None)
    if known is None:
        known = folder_lineage(str(getattr(base, "name_or_path", "") or ""))
        setattr(base, _ATTRIBUTE, known)
    return known


def note_merged(model: torch.nn.Module, adapter: str) -> None:
    """Record on `model` (the result of merge_and_unload) that `adapter` is now in its weights."""
    base = _base_model(model)
    setattr(base, _ATTRIBUTE, lineage_of(base).merging(adapter))


def record_base(model_or_path: torch.nn.Module | str, folder: str | Path) -> None:
    """Write into an adapter folder what its adapter was trained on: the lineage of `model_or_path`
    (the model being trained, wrapped or not, or the model_name_or_path it was loaded from). A
    folder without an adapter (full or freeze fine-tuning) is left as it is: its weights are the
    model."""
    if not (Path(folder) / "adapter_config.json").is_file():
        return
    if isinstance(model_or_path, str):
        from lmtune.models.load import resolve_model

        lineage = folder_lineage(resolve_model(model_or_path))
    else:
        lineage = lineage_of(model_or_path)
    (Path(folder) / BASE_RECORD).write_text(json.dumps(lineage.to_json(), indent=2) + "\n")


# --- the rule ---------------------------------------------------------------------------------------

def _peft_base_name(adapter: str) -> str | None:
    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


def check_adapter(model: torch.nn.Module, adapter: str) -> None:
    """Refuse to put `adapter` on `model` unless `model` holds the weights it was trained on.

    The one rule of every command that loads an adapter (chat, export, serve, eval, training on
    adapter_name_or_path): an adapter already merged into the model is refused by name; one whose
    record names other weights is refused with both lineages."""
    here = lineage_of(model)
    loaded = str(getattr(_base_model(model), "name_or_path", "") or "") or "this model"
    fingerprint = adapter_fingerprint(adapter)
    for merged_path, merged_fingerprint in here.merged:
        if merged_fingerprint == fingerprint:
            raise ModelError(f"adapter {adapter} is already merged into {loaded} (merged as "
                             f"{merged_path}); applying it again would add its change twice.",
                             f"load {loaded} without it (adapter_name_or_path=null), or put the "
                             "adapter on the model it was trained on.")
    trained_on = _read_record(Path(adapter) / BASE_RECORD)
    if trained_on is not None:
        if not trained_on.same_weights(here):
            merged = [p for p, _ in trained_on.merged]
            raise ModelError(
                f"adapter {adapter} was trained on {trained_on.describe()}, not on {loaded}, which "
                f"holds {here.describe()}; on other weights it computes nonsense.",
                f"load it on model_name_or_path={trained_on.base}"
                + (f" with adapter_name_or_path={','.join(merged + [adapter])}" if merged else "")
                + ".")
        return
    named = _peft_base_name(adapter)
    if named is None or here.fingerprint is None or named == here.base:
        return
    theirs = folder_lineage(named) if _weights_folder(named) else None
    if theirs is not None and theirs.fingerprint is not None \
            and theirs.fingerprint != here.fingerprint:
        raise ModelError(f"adapter {adapter} names {named} as its base (base_model_name_or_path in "
                         f"adapter_config.json), whose weights differ from those of {loaded}.",
                         f"load it on model_name_or_path={named}.")
