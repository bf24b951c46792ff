"""compare.yaml: the spec and its variants, each validated as a complete training config before
anything trains. The file's layout is in lmtune/compare/__init__.py."""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmtune.config import (build_config, check_training_inputs, keys_for_other_methods,
                           parse_overrides, read_yaml)
from lmtune.errors import ConfigError, LmtuneError

REPORT_MD, REPORT_JSON, REPORT_PNG = "compare.md", "compare.json", "compare.png"
BASE_EVAL = "compare_base_eval.json"  # the base model's benchmark accuracy, in output_dir
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_POINT = re.compile(r"^[A-Za-z0-9_.+=,-]+$")
EVAL_KEYS = ("task_dir", "n_shot", "lang", "batch_size")  # lmtune eval's keys compare passes on


class CompareSpec(BaseModel):
    """compare.yaml. Each field's description is its documentation."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field(description="Folder for compare.md/json/png and one folder per variant.")
    base_config: str | None = Field(None, description="Training YAML every variant starts from.")
    base: dict[str, Any] = Field(default_factory=dict,
                                 description="Training keys for every variant, over base_config's.")
    variants: list[dict[str, Any]] = Field(
        min_length=1, description="Each a `name` plus the training keys it changes.")
    score: Literal["exact", "contains"] = Field(
        "exact", description="exact: the answer equals the reference reply (whitespace aside); "
        "contains: it holds score_expect, on the val rows whose reference holds it.")
    score_expect: str | None = Field(
        None, description="contains: the text a right answer holds; {{key}} from data_vars.")
    score_max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per answer.")
    eval_task: str | None = Field(
        None, description="A benchmark column: each variant's and the base model's accuracy on "
        "this task of `lmtune eval` (e.g. mmlu_sample_test), read with task_dir, n_shot, lang "
        "and batch_size.")
    task_dir: str = Field("evaluation", description="eval_task: folder holding the benchmark folders.")
    n_shot: int = Field(5, ge=0, description="eval_task: solved dev questions shown before each one.")
    lang: Literal["en", "zh"] = Field("en", description="eval_task: language of the question frame.")
    batch_size: int = Field(4, ge=1, description="eval_task: questions per forward pass.")
    overwrite_output_dir: bool = Field(
        False, description="Train again into variant folders an earlier compare left (each is "
        "deleted first, and only if an lmtune run wrote it); without it, an existing one is refused.")


class SweepPoint(BaseModel):
    label: str  # key=value[,key=value]: its folder inside the variant's
    values: dict[str, Any]
    config: dict[str, Any]


class Variant(BaseModel):
    name: str
    changes: dict[str, Any]  # the training keys the variant itself sets (its sweep aside)
    config: dict[str, Any]  # its complete training config: base, minus left_out, plus changes
    left_out: list[str]  # base keys of other methods
    sweep: dict[str, list[Any]] = {}  # key -> values tried; each combination trains once
    points: list[SweepPoint] = []  # the combinations, in the order they train


def load_spec(path: str, overrides: list[str]) -> tuple[CompareSpec, list[Variant]]:
    """Read compare.yaml and validate every variant's training config before anything trains.
    `overrides` (key=value) apply to the base."""
    raw = read_yaml(path)
    known = list(CompareSpec.model_fields)
    for key in raw:
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(f"{path}: unknown key '{key}'.",
                              f"did you mean '{guess[0]}'?" if guess else f"use {', '.join(known)}.")
    try:
        spec = CompareSpec(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg'].lower()}",
                          "see the example in examples/compare_methods.yaml.") from None
    if spec.score == "contains" and not spec.score_expect:
        raise ConfigError(f"{path}: score: contains needs score_expect.",
                          "add e.g. score_expect: '{{name}}' (filled from data_vars).")
    if spec.eval_task:  # a bad benchmark folder fails now, not after the first training
        from lmtune.evaluate.benchmarks import load_benchmark

        try:
            load_benchmark(spec.task_dir, spec.eval_task, spec.n_shot)
        except LmtuneError as exc:
            raise ConfigError(f"{path}: eval_task: {exc.message}", exc.fix) from None
    base = read_yaml(spec.base_config) if spec.base_config else {}
    base |= spec.base
    base |= parse_overrides(overrides)
    return spec, [_variant(path, spec, base, raw) for raw in _unique(path, spec.variants)]


def _unique(path: str, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = [str(v.get("name", "")) for v in variants]
    for name in names:
        if not _NAME.match(name) or name in (REPORT_MD, REPORT_JSON, REPORT_PNG, BASE_EVAL):
            raise ConfigError(f"{path}: variant name {name!r} cannot name a folder in output_dir.",
                              "give each variant a name of letters, digits and _ . + -, e.g. lora-r16.")
        if names.count(name) > 1:
            raise ConfigError(f"{path}: two variants are named {name}.", "give each a unique name.")
    return variants


def _variant(path: str, spec: CompareSpec, base: dict[str, Any], raw: dict[str, Any]) -> Variant:
    changes = {k: v for k, v in raw.items() if k not in ("name", "sweep")}
    if "output_dir" in changes:
        raise ConfigError(f"{path}: variant {raw['name']} sets output_dir.",
                          "remove it: each variant trains in output_dir/<name>.")
    method = changes.get("finetuning_type", base.get("finetuning_type", "lora"))
    foreign = keys_for_other_methods(str(method))
    left_out = sorted(k for k in base if k in foreign and k not in changes)
    config = {k: v for k, v in base.items() if k not in left_out} | changes
    folder = Path(spec.output_dir) / raw["name"]
    config |= {"output_dir": str(folder), "overwrite_output_dir": spec.overwrite_output_dir}
    where = f"{path}: variant {raw['name']}"
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) \
            and not spec.overwrite_output_dir:
        raise ConfigError(f"{where}: its folder {folder} already exists; compare trains each variant "
                          "into output_dir/<name> and will not replace it unasked.",
                          "choose another output_dir for the comparison, or add "
                          "overwrite_output_dir: true to compare.yaml to train those variants again.")
    sweep = _sweep(where, raw.get("sweep"), changes)
    points = []
    for values in itertools.product(*sweep.values()) if sweep else []:
        chosen = dict(zip(sweep, values))
        label = ",".join(f"{k}={v}" for k, v in chosen.items())
        if not _POINT.match(label):
            raise ConfigError(f"{where}: sweep point {label!r} cannot name a folder.",
                              "sweep numbers or words of letters, digits and _ . + -.")
        points.append(SweepPoint(label=label, values=chosen, config=config | chosen | {
            "output_dir": str(folder / label)}))
    for where_, run in [(where, config)] if not points else \
            [(f"{where}, sweep point {p.label}", p.config) for p in points]:
        try:
            check_training_inputs(build_config(run, source=where_))
        except ConfigError as exc:  # key and type errors name their source already; combinations not
            message = exc.message if exc.message.startswith(where_) else f"{where_}: {exc.message}"
            raise ConfigError(message, exc.fix) from None
    return Variant(name=raw["name"], changes=changes, config=config, left_out=left_out,
                   sweep=sweep, points=points)


def _sweep(where: str, sweep: Any, changes: dict[str, Any]) -> dict[str, list[Any]]:
    """The variant's `sweep:` checked: training keys, each with a list of distinct plain values."""
    if sweep is None:
        return {}
    example = "write e.g. sweep: {learning_rate: [1.0e-4, 5.0e-4, 2.0e-3]}."
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{where}: sweep must map training keys to lists of values.", example)
    for key, values in sweep.items():
        if key in ("name", "output_dir", "sweep", "finetuning_type"):
            raise ConfigError(f"{where}: sweep cannot vary {key}.",
                              "make each method a variant of its own; " + example)
        if key in changes:
            raise ConfigError(f"{where}: {key} is both set and swept.",
                              f"remove {key}: {changes[key]} or its sweep.")
        if not isinstance(values, list) or not values or \
                any(isinstance(v, (dict, list)) or v is None for v in values):
            raise ConfigError(f"{where}: sweep {key} must be a list of numbers or words.", example)
        if len({str(v) for v in values}) < len(values):
            raise ConfigError(f"{where}: sweep {key} repeats a value.", "list each value once.")
    return dict(sweep)
