"""`reward_model: module:function`: import a Python reward function for stage ppo.

Importing the module runs its code, with the user's permissions, as `python -m` would: a module in
the working folder is found first, then installed packages. The working folder is on sys.path only
for the import, so later imports of the run cannot pick up a stray file from it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from lmtune.errors import ConfigError

_FIX = "name an importable module and a function in it, e.g. reward_model: my_rewards:score."


def load_reward_function(spec: str) -> Callable[..., Any]:
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"reward_model: {spec} is not module:function.", _FIX)
    added = "" not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:
        raise ConfigError(f"reward_model: {exc.filename}, line {exc.lineno}: {exc.msg} (a syntax "
                          f"error in the module of {spec}).", "fix the module's syntax.") from None
    except ImportError as exc:
        raise ConfigError(f"reward_model: cannot import {module_name}: {exc}", _FIX) from None
    except Exception as exc:  # the module's own code failed while it was imported
        raise ConfigError(f"reward_model: importing {module_name} ({spec}) raised "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          "fix the module: it must import without errors.") from None
    finally:
        if added and "" in sys.path:
            sys.path.remove("")
    function = getattr(module, name, None)
    if not callable(function):
        where = getattr(module, "__file__", module_name)
        raise ConfigError(f"reward_model: {where} has no function {name}"
                          + ("" if function is None else f" ({name} is a {type(function).__name__})"),
                          _FIX)
    return function
