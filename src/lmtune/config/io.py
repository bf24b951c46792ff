"""Reading a config: YAML file + `key=value` overrides -> a validated RunConfig, and the help text.

Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the key and the
fix, before any model or data is touched.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmtune.config.rules import check_combinations
from lmtune.config.schema import ACCEPTED_NOT_APPLIED, NOT_SUPPORTED, REFUSED_FEATURES, RunConfig
from lmtune.errors import ConfigError

# Values besides the catalogued default that mean what lmtune does anyway: a reward model's folder
# says whether it is LoRA or full.
_SAME_AS_DEFAULT = {("reward_model_type", "full")}


def _describe_type_error(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    return f"{key}: {err['msg'].lower()} (got {value!r})"


def _closest(key: Any, choices: list[str]) -> str | None:
    # str(): YAML keys may be numbers, booleans or null (`1: x`, `~: x`), which difflib cannot compare.
    match = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
    return match[0] if match else None


def _means_default(key: str, value: Any, default: Any) -> bool:
    # Compared pair by pair: a YAML value may be a list or mapping, which no set can hold.
    return value == default or any(key == k and value == v for k, v in _SAME_AS_DEFAULT)


def known_keys() -> list[str]:
    return sorted(k for k in RunConfig.model_fields if k != "not_applied")


def build_config(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a flat dict of keys into a RunConfig. `source` names the file in messages."""
    values = dict(values)
    not_applied = {k: values.pop(k) for k in list(values) if k in ACCEPTED_NOT_APPLIED}
    off_only = {k: values.pop(k) for k in list(values) if k in NOT_SUPPORTED}
    refused = {k: values.pop(k) for k in list(values) if k in REFUSED_FEATURES}
    valid = known_keys()
    problems = []  # (message, fix) per key, all reported at once: one edit fixes the whole file
    for key in values:
        if key not in valid:
            guess = _closest(key, valid + list(ACCEPTED_NOT_APPLIED) + list(NOT_SUPPORTED)
                             + list(REFUSED_FEATURES))
            problems.append((f"unknown key '{key}'",
                             f"did you mean '{guess}'?" if guess else None))
    for key, value in off_only.items():
        default, fix = NOT_SUPPORTED[key]
        if not _means_default(key, value, default):
            problems.append((f"{key}: {value!r} is a LLaMA-Factory feature lmtune does not have", fix))
    for key, value in refused.items():
        default, reason = REFUSED_FEATURES[key]
        if not _means_default(key, value, default):
            problems.append((f"{key}: {value!r} is refused", reason))
    if len(problems) == 1:
        message, fix = problems[0]
        raise ConfigError(f"{source}: {message}.", fix or "see `lmtune train --help` for every key.")
    if problems:
        lines = "".join(f"\n  - {message}" + (f": {fix}" if fix else "") for message, fix in problems)
        raise ConfigError(f"{source}: {len(problems)} keys lmtune cannot use:{lines}",
                          "rename or remove each key above; `lmtune train --help` lists every key.")
    try:
        cfg = RunConfig(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{source}: {_describe_type_error(first)}",
                          f"see `lmtune train --help` for the type of '{first['loc'][0]}'.") from None
    check_combinations(cfg, set(values))
    cfg.not_applied = not_applied
    return cfg


# PyYAML raises more than YAMLError on text it parses but cannot build a value from: ValueError for
# `2001-13-45`, `!!float abc` or an integer over Python's 4300-digit limit, AttributeError for
# `!!timestamp abc`, RecursionError for `[[[[...` nested deeper than the interpreter's stack.
_YAML_VALUE_ERRORS = (ValueError, AttributeError, RecursionError)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> typed values (YAML scalars). `data_vars.name=X` sets one data var."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{pair}' is not key=value.", "write e.g. learning_rate=1e-4.")
        if "." in key:  # a data var is text: kept verbatim (007 stays 007)
            parent, child = key.split(".", 1)
            if not isinstance(values.get(parent), dict):  # after `data_vars=5`: the later override wins
                values[parent] = {}
            values[parent][child] = raw
            continue
        try:
            values[key] = yaml.safe_load(raw) if raw else None
        except (yaml.YAMLError, *_YAML_VALUE_ERRORS):
            values[key] = raw
    return values


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}", "check the path.")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}).",
                          "save the file as UTF-8.") from None
    except OSError as exc:  # is_file() itself raises for e.g. a name longer than the OS allows
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}", "check the path.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None)
        if isinstance(exc, yaml.reader.ReaderError):  # its str() ends in PyYAML's own position text
            where = f" (character {exc.position + 1})"
            problem = f"character U+{exc.character:04X} cannot appear in YAML ({exc.reason})"
        raise ConfigError(f"{p}: not valid YAML{where}: {problem or exc}",
                          "fix the YAML syntax; keys are flat, e.g. `learning_rate: 1.0e-4`.") from None
    except RecursionError:
        raise ConfigError(f"{p}: values are nested too deeply to read.",
                          "keys are flat, e.g. `learning_rate: 1.0e-4`; values are scalars, short "
                          "lists or (data_vars) one mapping.") from None
    except _YAML_VALUE_ERRORS as exc:
        reason = str(exc).split(";")[0] if isinstance(exc, ValueError) else "it does not fit its !!tag"
        raise ConfigError(f"{p}: a value YAML cannot read ({reason}).",
                          "quote a value meant as text, e.g. `output_dir: '2001-13-45'`.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of key: value.",
                          "write one key per line, e.g. `model_name_or_path: default`.")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + key=value overrides -> validated RunConfig."""
    values = read_yaml(path) if path else {}
    extra = parse_overrides(overrides or [])
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    cfg = build_config(values, source=str(path) if path else "command line")
    cfg._null_on_command_line = {key for key, value in extra.items() if value is None}
    return cfg


def describe_keys() -> str:
    """Help text: every key with its type, default and description, in schema order."""
    lines = []
    for name, field in RunConfig.model_fields.items():
        if name == "not_applied":
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {name} (default {default!r})\n      {field.description}")
    accepted = ", ".join(sorted(ACCEPTED_NOT_APPLIED))
    lines.append(f"\n  Accepted for compatibility, not applied (listed at start-up with why): {accepted}")
    off_only = ", ".join(f"{k} ({v[0]!r})" for k, v in sorted(NOT_SUPPORTED.items()))
    lines.append(f"  LLaMA-Factory keys accepted only at their default (the feature is not in lmtune): "
                 f"{off_only}")
    refused = ", ".join(sorted(REFUSED_FEATURES))
    lines.append(f"  Refused unless left at LLaMA-Factory's default (hardware, launchers or inputs "
                 f"lmtune does not drive): {refused}")
    return "\n".join(lines)
