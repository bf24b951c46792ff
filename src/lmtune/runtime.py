"""Process set-up that every entry point (the CLI, compare's child processes, the server) calls first,
so a run behaves the same however it was started.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from lmtune.hub import AUTO_MARKER

if TYPE_CHECKING:
    from lmtune.config import RunConfig

ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def configure() -> None:
    """Offline hub defaults, quiet libraries, plain log lines. Safe to call more than once."""
    # Every library starts offline; lmtune.hub allows the network around a hub id's load when the
    # hub answers, unless the user set HF_HUB_OFFLINE themselves.
    if "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = os.environ[AUTO_MARKER] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # The tokenizers library's own threads fight the data workers and torch for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # oneDNN (torch's bf16 matmuls on the CPU) keeps up to 1,024 matmuls it compiled, with their
    # scratch memory, and every new row count of a batch compiles new ones. One micro-batch's
    # forward and backward reuse a few dozen: 64 keeps the speed and drops the rest
    # (benchmarks/memory_levers.py). Read when oneDNN first compiles, so set before any work.
    os.environ.setdefault(ONEDNN_CACHE, "64")
    # peft calls a transformers API that transformers 5 deprecated; the message means nothing to users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes on CPU: at import it advises installing an optional kernel package (its fallback
    # is what runs here), and 8-bit layers announce every call that they compute in fp16. Neither is
    # something a user can act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from lmtune.measure import report_peak_rss_at_exit

    report_peak_rss_at_exit()


def leave_out_bitsandbytes(cfg: RunConfig) -> bool:
    """Keep bitsandbytes from loading in a fresh process whose run cannot use it: no
    quantization_bit, no 8-bit or paged optimizer, and no model whose config.json records a
    quantization (a pre-quantized checkpoint). peft imports it whenever it is installed, which costs
    every run about 45 MiB and 0.7 s. With the module marked absent, peft and transformers find no
    bitsandbytes and take their plain paths. -> whether it was left out."""
    from lmtune.config.rules import BITSANDBYTES_OPTIMIZERS

    if "bitsandbytes" in sys.modules or cfg.quantization_bit is not None or \
            cfg.optim in BITSANDBYTES_OPTIMIZERS:
        return False
    models = [cfg.model_name_or_path, cfg.ref_model, cfg.reward_model]
    configs = [_config_json(name) for name in models if name]
    if any(config is None or "quantization_config" in config for config in configs):
        return False
    sys.modules["bitsandbytes"] = None
    return True


def _config_json(name: str) -> dict | None:
    """The config.json of a model named in a config, where it can be read without loading anything
    (the built-in model has none to read and is not quantized); None where it cannot."""
    if name == "default" or (":" in name and not Path(name).exists()):  # or a reward function
        return {}
    folder = Path(name).expanduser()
    if not folder.is_dir() and name.count("/") == 1:  # a hub id: its cached config, if any
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        folder = Path(cached).parent if isinstance(cached, str) else folder
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
