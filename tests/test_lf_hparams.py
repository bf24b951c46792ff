"""Every LLaMA-Factory hparams key and every Seq2SeqTrainingArguments field gets an answer: applied,
accepted but not applied, accepted only at LLaMA-Factory's default, or refused by name. None falls
through as an unknown key. Config validation only: no model or data is loaded."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import Seq2SeqTrainingArguments

from lmtune.config import ACCEPTED_NOT_APPLIED, NOT_SUPPORTED, REFUSED_FEATURES, RunConfig, build_config
from lmtune.errors import ConfigError
from tests.lf_hparams import APPLIED, DEFAULT_ONLY, LF_KEYS, NOT_APPLIED, OLD_TRAINING_KEYS, REFUSED

KEYS = LF_KEYS | OLD_TRAINING_KEYS

CATALOGUE = {NOT_APPLIED: ACCEPTED_NOT_APPLIED, DEFAULT_ONLY: NOT_SUPPORTED, REFUSED: REFUSED_FEATURES}
OFF_DEFAULT = [k for k, (answer, _) in KEYS.items() if answer in (DEFAULT_ONLY, REFUSED)]


def other_than(default):
    """A value different from `default` (types do not matter: refusal comes before validation)."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    return "something-else" if default is None else f"{default}-else"


def answer_of(key: str) -> str | None:
    if key in RunConfig.model_fields:
        return APPLIED
    return next((answer for answer, catalogue in CATALOGUE.items() if key in catalogue), None)


def test_the_table_matches_the_schema():
    wrong = {k: (answer, answer_of(k)) for k, (answer, _) in KEYS.items() if answer_of(k) != answer}
    assert wrong == {}, "key: (table's answer, lmtune's answer)"


def test_no_key_has_two_answers():
    homes = [set(RunConfig.model_fields), *map(set, CATALOGUE.values())]
    twice = {k for i, a in enumerate(homes) for b in homes[i + 1:] for k in a & b}
    assert twice == set()


def test_catalogued_defaults_are_llamafactorys():
    # A YAML that spells out LLaMA-Factory's default must load, so the catalogue's default is its.
    wrong = {k: (d, CATALOGUE[a][k][0]) for k, (a, d) in KEYS.items()
             if a in (DEFAULT_ONLY, REFUSED) and CATALOGUE[a][k][0] != d}
    assert wrong == {}


def test_a_config_with_every_unapplied_key_at_its_default_loads():
    values = {k: d for k, (a, d) in KEYS.items() if a != APPLIED}
    cfg = build_config(values)
    assert set(cfg.not_applied) == {k for k, (a, _) in KEYS.items() if a == NOT_APPLIED}
    dumped = cfg.to_yaml_dict()
    assert not set(values) & set(dumped)


@pytest.mark.parametrize("key", OFF_DEFAULT)
def test_another_value_is_refused_with_the_reason(key):
    answer, default = KEYS[key]
    value = other_than(default)
    with pytest.raises(ConfigError) as info:
        build_config({key: value})
    reason = CATALOGUE[answer][key][1]
    assert info.value.message.startswith(f"config: {key}: {value!r}")
    assert info.value.fix == reason


def test_every_refusal_is_reported_at_once_with_unknown_keys():
    values = {k: other_than(KEYS[k][1]) for k in OFF_DEFAULT} | {"learning_rat": 1e-4}
    with pytest.raises(ConfigError) as info:
        build_config(values)
    message = info.value.message
    assert f"{len(values)} keys lmtune cannot use" in message
    assert all(f"\n  - {k}: " in message for k in OFF_DEFAULT)
    assert "unknown key 'learning_rat': did you mean 'learning_rate'?" in message


def test_no_llamafactory_key_is_unknown():
    unknown = []
    for key, (_, default) in KEYS.items():
        try:
            build_config({key: other_than(default)})
        except ConfigError as exc:
            if "unknown key" in exc.message:
                unknown.append(key)
    assert unknown == []


def test_every_seq2seq_training_argument_has_an_answer():
    fields = [f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init]
    assert len(fields) > 100  # the enumeration itself worked
    assert [k for k in fields if answer_of(k) is None] == []


def test_catalogued_training_arguments_keep_transformers_defaults():
    # optim's default changed across transformers versions; both names are plain AdamW here.
    defaults = {f.name: f.default for f in dataclasses.fields(Seq2SeqTrainingArguments)
                if f.init and f.default is not dataclasses.MISSING and f.name != "optim"}
    wrong = {k: (d, CATALOGUE[answer_of(k)][k][0]) for k, d in defaults.items()
             if answer_of(k) in (DEFAULT_ONLY, REFUSED) and CATALOGUE[answer_of(k)][k][0] != d}
    assert wrong == {}
    for name in ("adamw_torch", "adamw_torch_fused"):
        build_config({"optim": name})


@pytest.mark.parametrize("method,named", [("gptq", "GPTQ"), ("awq", "AWQ"), ("aqlm", "AQLM"),
                                          ("eetq", "EETQ"), ("hqq", "HQQ"), ("quanto", "quanto"),
                                          ("mxfp4", "MXFP4"), ("fp8", "FP8")])
def test_quantization_methods_without_cpu_kernels_are_refused_by_name(method, named):
    with pytest.raises(ConfigError) as info:
        build_config({"quantization_method": method, "quantization_bit": 4})
    assert info.value.message.startswith(f"quantization_method: {method} is refused: {named}")
    assert "quantization_method: bnb" in info.value.fix
