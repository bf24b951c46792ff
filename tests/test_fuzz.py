"""Bad input never gives a traceback: property-based fuzzing of configs, YAML, overrides and datasets.

Hypothesis generates flat config dicts, YAML text, `key=value` overrides, dataset files with their
dataset_info.json entries, and whole `lmtune train` command lines. Each case must either work or raise
one LmtuneError whose message names the key or file and carries a fix; any other exception fails the
test. 1,550 generated cases in all (see MAX_EXAMPLES), then example-based regression tests for every
crash the fuzzing found.
"""

from __future__ import annotations

import contextlib
import io
import json
import string
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtune.cli import main
from lmtune.config import (ACCEPTED_NOT_APPLIED, NOT_SUPPORTED, REFUSED_FEATURES, RunConfig, build_config,
                           known_keys, load_config, parse_overrides, read_yaml)
from lmtune.data.sources import load_conversations
from lmtune.errors import ConfigError, DataError, LmtuneError
from tests.conftest import ALPACA, write_json, write_yaml

KEYS = known_keys()

# Cases per property; together well over the 1,000 the reliability issue asks for.
MAX_EXAMPLES = {"config_dict": 400, "yaml_text": 300, "overrides": 300, "dataset": 450, "cli": 100}
assert sum(MAX_EXAMPLES.values()) >= 1000

# database=None: each run starts fresh (no replay of saved examples); a failure prints the example
# to reproduce it.
FUZZ = dict(deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# What a library's own error text looks like (pydantic's, PyYAML's, Python's): a message holding
# one was passed through instead of being said in the user's terms.
RAW_LIBRARY_TEXT = ("validation error for", "errors.pydantic.dev", "Input should be", "<unicode string>",
                    "Traceback", "Errno")


def assert_user_error(exc: LmtuneError) -> str:
    """The one message the CLI prints: non-empty, with a fix, and in lmtune's words, not a library's."""
    assert isinstance(exc.message, str) and exc.message.strip()
    assert exc.fix and exc.fix.strip()
    text = str(exc)
    assert not [raw for raw in RAW_LIBRARY_TEXT if raw in text], text
    return text


# --- strategies: keys and values ------------------------------------------------------------------

def _near_miss(key: str, at: int, how: str) -> str:
    """A typo of a real key: what a user types by mistake."""
    at %= len(key)
    if how == "drop":
        return key[:at] + key[at + 1:]
    if how == "double":
        return key[:at] + key[at] + key[at:]
    if how == "swap" and at + 1 < len(key):
        return key[:at] + key[at + 1] + key[at] + key[at + 2:]
    if how == "dash":
        return key.replace("_", "-")
    if how == "upper":
        return key.upper()
    return key + "s"


near_misses = st.builds(_near_miss, st.sampled_from(KEYS), st.integers(0, 40),
                        st.sampled_from(["drop", "double", "swap", "dash", "upper", "plural"]))

config_keys = st.one_of(
    st.sampled_from(KEYS), st.sampled_from(KEYS),  # twice: real keys are what reach the type checks
    near_misses,
    st.sampled_from(sorted(ACCEPTED_NOT_APPLIED)), st.sampled_from(sorted(NOT_SUPPORTED)),
    st.text(max_size=12),
    # YAML turns `1:`, `true:`, `~:` and `1.5:` into non-string keys.
    st.integers(-5, 5), st.booleans(), st.none(), st.floats(allow_nan=True),
)

# Values that are valid for some key, so that generated configs also get past the type checks and
# reach check_combinations.
plausible = st.sampled_from([
    0, 1, 2, 3, -1, 8, 500, 0.0, 0.1, 0.5, 0.999, 1.5, 2.0, 1e-4, True, False, None, "", "lora", "full",
    "freeze", "sft", "dpo", "cosine", "linear", "none", "no", "steps", "epoch", "auto", "cpu", "all",
    "q_proj,v_proj", "identity", "saves/x", "1e-4", "true", "default", "none,none", "a,b",
])
scalars = st.one_of(
    plausible, plausible,
    st.integers(), st.integers(-10**40, 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=20),
)
config_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner,
                                            max_size=3)),
    max_leaves=8)
config_dicts = st.dictionaries(config_keys, config_values, max_size=6)


# --- a. build_config on flat dicts ----------------------------------------------------------------

@settings(max_examples=MAX_EXAMPLES["config_dict"], **FUZZ)
@given(values=config_dicts)
def test_build_config_accepts_or_names_the_key(values):
    try:
        cfg = build_config(values)
    except ConfigError as exc:
        text = assert_user_error(exc)
        unknown = [k for k in values
                   if k not in KEYS and k not in ACCEPTED_NOT_APPLIED and k not in NOT_SUPPORTED
                   and k not in REFUSED_FEATURES]
        if unknown:  # every unknown key is reported at once, each with a guess or a pointer to --help
            assert all(f"unknown key '{key}'" in text for key in unknown), text
        else:  # a wrong type or a combination: defaults are valid, so the culprit is an input key
            assert any(str(k) in text for k in values), text
    else:
        assert isinstance(cfg, RunConfig)
        assert set(cfg.not_applied) <= set(ACCEPTED_NOT_APPLIED)


# --- b. load_config on YAML text -------------------------------------------------------------------

yaml_oddities = st.sampled_from([
    "!!timestamp abc", "!!float abc", "!!int abc", "!!binary '!!!'", "!!binary é", "!!set {a}",
    "!!python/object:os.system", "!!map []", "!!seq {}", "!!str", "2001-13-45", "2001-02-30 10:00:00",
    "2024-01-01", "&a [*a]", "*nowhere", "{", "[", "]", "'", '"', "|", ">", "- a", ":", "? x", ".inf",
    "-.inf", ".nan", "~", "null", "yes", "no", "on", "0x1F", "0o17", "1_000", "1:30:00", "1e3",
    "1.0e+999", "\t", "{a: 1, a: 2}", "<<: 5", "[1, [2, [3]]]", "{name: Orrin}", "'007'", "@", "`",
])
yaml_values = st.one_of(
    yaml_oddities, yaml_oddities,
    st.text(max_size=20),
    st.integers().map(str), st.floats().map(str),
    st.integers(1, 3000).map(lambda n: "[" * n),  # nested past the parser's stack
    st.integers(1, 600).map(lambda n: "[" * n + "]" * n),
    st.integers(4000, 5000).map(lambda n: "1" * n),  # past Python's int-from-text limit
)
yaml_lines = st.builds(lambda key, sep, value: f"{key}{sep}{value}",
                       st.one_of(st.sampled_from(KEYS), near_misses, st.text(max_size=8)),
                       st.sampled_from([": ", ":", " : ", "=", ":\n  ", ": - "]), yaml_values)
yaml_documents = st.one_of(
    st.lists(yaml_lines, max_size=6).map("\n".join),
    st.lists(yaml_lines, max_size=4).map(lambda lines: "---\n" + "\n".join(lines) + "\n---\nseed: 1"),
    config_dicts.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    config_values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),  # lists, scalars at the top
    st.text(max_size=80),
    st.binary(max_size=40),  # mostly not UTF-8
)


@settings(max_examples=MAX_EXAMPLES["yaml_text"], **FUZZ)
@given(document=yaml_documents, where=st.sampled_from(["file"] * 8 + ["missing", "dir", "long"]))
def test_load_config_reads_or_names_the_file(document, where):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        data = document if isinstance(document, bytes) else document.encode("utf-8", "surrogatepass")
        if where == "file":
            path.write_bytes(data)
        elif where == "dir":
            path.mkdir()
        elif where == "long":
            path = Path(tmp) / ("x" * 300 + ".yaml")  # longer than a file name may be
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            text = assert_user_error(exc)
            if str(path) not in text:
                # Every message about a YAML file names it; only a combination of keys is refused
                # without it, so the file must have read and every key and value passed on its own.
                assert where == "file", text
                values = read_yaml(path)
                assert all(k in KEYS or k in ACCEPTED_NOT_APPLIED or k in NOT_SUPPORTED
                           for k in values), text
                assert all(v == NOT_SUPPORTED[k][0] or (k, v) == ("reward_model_type", "full")
                           for k, v in values.items() if k in NOT_SUPPORTED), text
                RunConfig(**{k: v for k, v in values.items() if k in KEYS})
        else:
            assert where == "file" and isinstance(cfg, RunConfig)


# --- c. load_config on key=value overrides ---------------------------------------------------------

override_keys = st.one_of(
    st.sampled_from(KEYS), near_misses, st.text(max_size=8),
    st.sampled_from(["data_vars.name", "data_vars.", "data_vars.a.b", "seed.x", ".x", "x.", "", "."]),
)
overrides = st.lists(
    st.one_of(
        st.builds(lambda key, sep, value: f"{key}{sep}{value}", override_keys,
                  st.sampled_from(["=", "=", "==", ""]), yaml_values),
        st.text(max_size=30),
    ),
    max_size=5)


@settings(max_examples=MAX_EXAMPLES["overrides"], **FUZZ)
@given(pairs=overrides)
def test_overrides_apply_or_name_the_key(pairs):
    try:
        cfg = load_config(None, pairs)
    except ConfigError as exc:
        text = assert_user_error(exc)
        # Either the malformed pair itself, or a key from one of the pairs.
        named = [pair for pair in pairs] + [pair.partition("=")[0].split(".")[0] for pair in pairs]
        assert any(part in text for part in named), text
    else:
        assert isinstance(cfg, RunConfig)


# --- d. dataset files and dataset_info.json entries ------------------------------------------------

texts = st.one_of(st.sampled_from(["hi", "Hello there.", "", " ", "{{name}}", "{{ missing }}", "\u0000"]),
                  st.text(max_size=12))
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner,
                                                                           max_size=3)),
    max_leaves=6)

ROLE_TAGS = ["human", "gpt", "user", "assistant", "system", "tool", "observation", "function_call",
             "bot", "function"]
FIELDS = ["instruction", "input", "output", "system", "history", "tools", "conversations", "messages",
          "question", "answer", "chosen"]
turns = st.dictionaries(st.sampled_from(["from", "value", "role", "content", "name"]),
                        st.one_of(st.sampled_from(ROLE_TAGS), texts, json_values), max_size=3)
field_values = st.one_of(texts, json_values, st.lists(turns, max_size=4),
                         st.lists(st.lists(texts, max_size=3), max_size=3))
random_records = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=5)), field_values,
                                 max_size=6)


def _chat(role_tag: str, content_tag: str, user: str, assistant: str, column: str):
    def build(pairs: list[tuple[str, str]], system: str | None) -> dict:
        messages = [{role_tag: "system", content_tag: system}] if system is not None else []
        for question, answer in pairs:
            messages += [{role_tag: user, content_tag: question}, {role_tag: assistant, content_tag: answer}]
        return {column: messages}
    return st.builds(build, st.lists(st.tuples(texts, texts), max_size=3), st.none() | texts)


# Well-formed records (mostly), so that the success path and record-level checks are reached too.
plausible_records = st.one_of(
    st.fixed_dictionaries({"instruction": texts, "output": texts},
                          optional={"input": texts, "system": texts, "tools": json_values,
                                    "history": st.lists(st.tuples(texts, texts).map(list), max_size=2)}),
    _chat("from", "value", "human", "gpt", "conversations"),
    _chat("role", "content", "user", "assistant", "messages"),
)
records = st.lists(st.one_of(plausible_records, plausible_records, random_records, json_values),
                   max_size=5)

raw_files = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=30),
    st.integers(1, 3000).map(lambda n: "[" * n),
    st.integers(1, 200).map(lambda n: '[{"instruction": "a", "output": ' + "[" * n + '"b"' + "]" * n + "}]"),
    st.integers(4301, 5000).map(lambda n: '[{"instruction": "a", "output": ' + "7" * n + "}]"),
    st.integers(4301, 5000).map(lambda n: '{"instruction": "a", "output": "b", "n": ' + "7" * n + "}"),
    records.map(lambda rs: json.dumps(rs)[:-1]),  # cut short
)

column_names = ["prompt", "query", "response", "history", "system", "tools", "messages"]
tag_names = ["role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
             "system_tag"]
info_entries = st.fixed_dictionaries({}, optional={
    "file_name": st.one_of(st.just("data.FILE"), st.just("data.FILE"), st.just("missing.json"),
                           st.just("x" * 300 + ".json"), json_values),
    "formatting": st.one_of(st.sampled_from(["alpaca", "sharegpt", "openai"]), json_values),
    "columns": st.one_of(st.dictionaries(st.sampled_from(column_names), st.sampled_from(FIELDS) | json_values,
                                         max_size=3), json_values),
    "tags": st.one_of(st.dictionaries(st.sampled_from(tag_names), st.sampled_from(ROLE_TAGS) | json_values,
                                      max_size=3), json_values),
    "ranking": st.one_of(st.booleans(), json_values),
    "hf_hub_url": st.just("someone/data"),
})
dataset_infos = st.one_of(
    st.none(), st.none(),  # no dataset_info.json: the file is named by path
    info_entries.map(lambda entry: {"ds": entry}),
    info_entries.map(lambda entry: {"ds": entry}),
    json_values.map(lambda value: {"ds": value}),
    json_values,  # not a mapping at all
    st.one_of(st.text(max_size=20), st.binary(max_size=20)),  # not JSON / not UTF-8
)


@settings(max_examples=MAX_EXAMPLES["dataset"], **FUZZ)
@given(content=st.one_of(st.tuples(st.just("json"), records), st.tuples(st.just("jsonl"), records),
                         st.tuples(st.just("raw"), raw_files)),
       suffix=st.sampled_from([".json", ".json", ".jsonl", ".jsonl", ".txt", ""]),
       info=dataset_infos,
       by_relative_name=st.booleans(),
       max_samples=st.none() | st.integers(1, 4),
       data_vars=st.dictionaries(st.sampled_from(["name", "author", "x"]), st.text(max_size=8), max_size=2))
def test_datasets_load_or_name_the_file(content, suffix, info, by_relative_name, max_samples, data_vars):
    kind, payload = content
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_file = root / f"data{suffix}"
        if kind == "json":
            data_file.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        elif kind == "jsonl":
            data_file.write_text("\n".join(json.dumps(r) for r in payload), encoding="utf-8")
        elif isinstance(payload, bytes):
            data_file.write_bytes(payload)
        else:
            data_file.write_bytes(payload.encode("utf-8", "surrogatepass"))
        if info is None:
            dataset = data_file.name if by_relative_name else str(data_file)
        else:
            dataset = "ds"
            info_file = root / "dataset_info.json"
            if isinstance(info, (str, bytes)):
                info_file.write_bytes(info if isinstance(info, bytes) else info.encode("utf-8", "surrogatepass"))
            else:
                entry = info.get("ds") if isinstance(info, dict) else None
                if isinstance(entry, dict) and entry.get("file_name") == "data.FILE":
                    info = {**info, "ds": {**entry, "file_name": data_file.name}}  # a copy: never
                write_json(info_file, info)  # change what hypothesis generated
        cfg = build_config({"dataset": dataset, "dataset_dir": str(root), "max_samples": max_samples,
                            "data_vars": data_vars})
        try:
            conversations, report = load_conversations(cfg)
        except DataError as exc:
            text = assert_user_error(exc)
            if exc.file is not None:  # the file is named first, then the record when one is at fault
                assert text.startswith(exc.file)
                if exc.record is not None:
                    assert text.startswith(f"{exc.file}, record {exc.record}: ")
            else:  # a dataset name that is neither registered nor a file
                assert f"dataset '{dataset}'" in text and str(root / "dataset_info.json") in text
        else:
            assert conversations and report.datasets[0].kept == len(conversations)
            for conv in conversations:
                assert all(isinstance(m["content"], str) for m in conv.messages)
                assert conv.messages[-1]["role"] == "assistant"


# --- e. `lmtune train` end to end on configs that fail before any model loads ---------------------

wrong_types = st.sampled_from([
    ("lora_rank", "many"), ("lora_rank", 0), ("learning_rate", "fast"), ("learning_rate", float("inf")),
    ("bf16", "maybe"), ("finetuning_type", "partial"), ("stage", "grpo"), ("cutoff_len", 1),
    ("max_samples", 0), ("top_p", 2), ("num_train_epochs", 0), ("warmup_steps", float("nan")),
    ("seed", [1, 2]), ("data_vars", "name"), ("report_to", "comet_ml"), ("export_legacy_format", True),
    ("val_size", -1), ("lr_scheduler_type", "exponential"), ("per_device_train_batch_size", 1.5),
    ("dataset_dir", {"a": 1}), ("output_dir", ["a", "b"]), ("eval_steps", -3),
])
combinations = st.sampled_from([
    {"bf16": True, "fp16": True}, {"finetuning_type": "full", "lora_rank": 4},
    {"finetuning_type": "lora", "freeze_trainable_layers": 1}, {"warmup_ratio": 0.1, "warmup_steps": 5},
    {"warmup_steps": 2.5}, {"val_size": 1.5}, {"eval_strategy": "steps"},
    {"resume_from_checkpoint": "auto", "overwrite_output_dir": True},
])
unknown_keys = st.one_of(near_misses, st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)).filter(
    lambda k: k not in KEYS and k not in ACCEPTED_NOT_APPLIED and k not in NOT_SUPPORTED
    and k not in REFUSED_FEATURES)
# Keys that never cause or cure one of the defects above.
noise = st.dictionaries(st.sampled_from(["seed", "logging_steps", "save_steps",
                                         "max_new_tokens", "per_device_train_batch_size"]),
                        st.integers(1, 9), max_size=3)


@st.composite
def bad_train_runs(draw):
    """(YAML text or config dict, overrides, a word the error must contain), always invalid."""
    values = {"dataset": "DATASET", "output_dir": "OUTPUT", **draw(noise)}
    defect = draw(st.sampled_from(["unknown", "type", "combination", "missing", "override", "yaml"]))
    overrides: list[str] = []
    if defect == "unknown":
        key = draw(unknown_keys)
        values[key] = draw(config_values)
        expect = f"'{key}'"
    elif defect == "type":
        key, value = draw(wrong_types)
        values[key] = value
        expect = key
    elif defect == "combination":
        combo = draw(combinations)
        values.update(combo)
        expect = sorted(combo)[0]
    elif defect == "missing":
        expect = draw(st.sampled_from(["dataset", "output_dir"]))
        del values[expect]
    elif defect == "override":
        key, value = draw(wrong_types)
        # `seed=oops[` is not YAML, so it stays text, which seed is not.
        overrides = [draw(st.sampled_from([f"{key}={json.dumps(value)}", "seed=oops[",
                                           "no_equals_sign", f"{draw(unknown_keys)}=1"]))]
        expect = overrides[0].partition("=")[0]
    else:  # not a mapping, not YAML, or not UTF-8
        document = draw(st.sampled_from(["- a\n- b\n", "just text", "seed: [1,\n", "a: b: c",
                                         "seed: !!float abc", "\t- x", b"\xff\xfe\x00s"]))
        return document, overrides, "RUN_YAML"
    return values, overrides, expect


@settings(max_examples=MAX_EXAMPLES["cli"], **FUZZ)
@given(run=bad_train_runs())
def test_train_cli_exits_2_with_one_message(run):
    document, overrides, expect = run
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_yaml = root / "run.yaml"
        if isinstance(document, dict):
            document = {k: str(write_json(root / "data.json", ALPACA)) if v == "DATASET"
                        else str(root / "out") if v == "OUTPUT" else v for k, v in document.items()}
            write_yaml(run_yaml, document)
        else:
            run_yaml.write_bytes(document if isinstance(document, bytes) else document.encode())
        expect = expect.replace("RUN_YAML", str(run_yaml))

        def reached_training(cfg):
            raise AssertionError(f"a bad config reached training: {cfg!r}")

        stdout, stderr = io.StringIO(), io.StringIO()
        with mock.patch.dict("lmtune.train.STAGES", {"sft": reached_training}), \
                contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["train", str(run_yaml), *overrides])
        err = stderr.getvalue()
        assert code == 2
        assert err.startswith("error: ") and "Traceback" not in err
        assert expect in err, err
        assert "fix: " in err
        assert not (root / "out").exists()


# --- regression tests: the crashes fuzzing found ---------------------------------------------------

@pytest.mark.parametrize("key", [1, None, True, 1.5])
def test_non_string_yaml_key_is_an_unknown_key(key, tmp_path):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        build_config({key: "x"})
    path = tmp_path / "run.yaml"
    path.write_text(f"{yaml.safe_dump(key).splitlines()[0]}: x\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)


@pytest.mark.parametrize("text", ["warmup_steps: .inf", "val_size: .inf", "learning_rate: .nan",
                                  "num_train_epochs: 1.0e+999", "max_grad_norm: -.inf"])
def test_infinite_or_nan_floats_are_refused(text, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"{text.split(':')[0]}: input should be a finite number"):
        load_config(path)


def test_data_var_override_after_a_plain_override_wins():
    assert parse_overrides(["data_vars=5", "data_vars.name=Orrin"]) == {"data_vars": {"name": "Orrin"}}
    assert load_config(None, ["data_vars=5", "data_vars.name=Orrin"]).data_vars == {"name": "Orrin"}


@pytest.mark.parametrize("text, reason", [
    ("seed: 2001-13-45", "month must be in 1..12"),
    ("seed: !!float abc", "could not convert string to float"),
    ("seed: !!timestamp abc", "does not fit its !!tag"),
    ("seed: " + "1" * 5000, "4300 digits"),
    ("seed: " + "[" * 5000, "nested too deeply"),
])
def test_yaml_values_pyyaml_cannot_build_are_config_errors(text, reason, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=reason) as info:
        load_config(path)
    assert str(path) in str(info.value) and info.value.fix


@pytest.mark.parametrize("value", ["2001-13-45", "!!float abc", "!!timestamp abc", "1" * 5000, "[" * 5000])
def test_override_values_pyyaml_cannot_build_are_kept_as_text(value):
    assert parse_overrides([f"output_dir={value}"]) == {"output_dir": value}
    with pytest.raises(ConfigError, match="command line: seed:"):
        load_config(None, [f"seed={value}"])


def test_config_file_not_utf8_or_name_too_long(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"seed: 1\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 8 is 0xff\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file .*File name too long"):
        load_config(tmp_path / ("x" * 300 + ".yaml"))


def _load(tmp_path: Path, dataset: str) -> None:
    load_conversations(build_config({"dataset": dataset, "dataset_dir": str(tmp_path)}))


@pytest.mark.parametrize("name, data, message", [
    ("bad.json", b'[{"instruction": "\xff", "output": "b"}]', r"not UTF-8 text \(byte 18 is 0xff\)"),
    ("deep.json", b"[" * 5000, "nested too deeply to read"),
    ("deep.jsonl", b'{"instruction": "a", "output": "b"}\n' + b"[" * 5000, "line 2: nested too deeply"),
    ("long.json", b'[{"instruction": "a", "output": ' + b"7" * 5000 + b"}]", "cannot be read: .*4300 digits"),
    ("long.jsonl", b'{"instruction": "a", "output": ' + b"7" * 5000 + b"}", "line 1: cannot be read"),
])
def test_unreadable_dataset_files_are_data_errors(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=message) as info:
        _load(tmp_path, name)
    assert info.value.file == str(tmp_path / name) and info.value.fix


@pytest.mark.parametrize("data", [b"\xff{}", b"[" * 5000, b'{"ds": ' + b"7" * 5000 + b"}"])
def test_unreadable_dataset_info_is_a_data_error(tmp_path, data):
    (tmp_path / "dataset_info.json").write_bytes(data)
    with pytest.raises(DataError) as info:
        _load(tmp_path, "ds")
    assert info.value.file == str(tmp_path / "dataset_info.json") and info.value.fix


@pytest.mark.parametrize("entry, message", [
    ({"file_name": 5}, "entry 'ds' has file_name 5, which is not a file name"),
    ({"file_name": None}, "entry 'ds' has file_name None"),
    ({"file_name": "data.json", "formatting": ["sharegpt"]}, "entry 'ds' has formatting"),
    ({"file_name": "data.json", "columns": ["prompt"]}, "entry 'ds' has columns"),
    ({"file_name": "data.json", "columns": {"prompt": ["q"]}}, "entry 'ds' has columns"),
    ({"file_name": "data.json", "tags": "from"}, "entry 'ds' has tags"),
    ({"file_name": "data.json", "formatting": "sharegpt", "tags": {"user_tag": None}}, "entry 'ds' has tags"),
])
def test_malformed_dataset_info_entries_are_data_errors(tmp_path, entry, message):
    write_json(tmp_path / "data.json", ALPACA)
    write_json(tmp_path / "dataset_info.json", {"ds": entry})
    with pytest.raises(DataError, match=message) as info:
        _load(tmp_path, "ds")
    assert info.value.file == str(tmp_path / "dataset_info.json") and info.value.fix


def test_sharegpt_role_that_is_a_list_is_a_record_error(tmp_path):
    path = write_json(tmp_path / "chat.json", [{"conversations": [
        {"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    with pytest.raises(DataError, match=r"record 0: message 0 has from=\['human'\]") as info:
        _load(tmp_path, str(path))
    assert info.value.record == 0


def test_dataset_names_longer_than_the_os_allows(tmp_path):
    with pytest.raises(DataError, match="is neither an entry"):
        _load(tmp_path, "x" * 300 + ".json")
    write_json(tmp_path / "dataset_info.json", {"ds": {"file_name": "x" * 300 + ".json"}})
    with pytest.raises(DataError, match="file not found"):
        _load(tmp_path, "ds")
