"""The run configuration: one flat YAML namespace with LLaMA-Factory's key names, typed and checked.

`load_config(path, overrides)` reads the YAML, applies `key=value` overrides, and returns a validated
`RunConfig`. schema.py holds the fields, rules.py the combinations refused, io.py the parsing.
"""

from lmtune.config.io import build_config, describe_keys, known_keys, load_config, parse_overrides, read_yaml
from lmtune.config.rules import (ADAPTER_METHODS, check_combinations, check_training_inputs,
                                 keys_for_other_methods)
from lmtune.config.schema import (ACCEPTED_NOT_APPLIED, NOT_SUPPORTED, REFUSED_FEATURES, RunConfig,
                                  split_list)

__all__ = ["ACCEPTED_NOT_APPLIED", "ADAPTER_METHODS", "NOT_SUPPORTED", "REFUSED_FEATURES", "RunConfig",
           "build_config", "check_combinations", "check_training_inputs", "describe_keys",
           "keys_for_other_methods", "known_keys", "load_config", "parse_overrides", "read_yaml",
           "split_list"]
