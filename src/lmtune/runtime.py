"""Process set-up that every entry point (the CLI, compare's child processes, the server) calls first,
so a run behaves the same however it was started.
"""

from __future__ import annotations

import logging
import os
import warnings

from lmtune.hub import AUTO_MARKER


def configure() -> None:
    """Offline hub defaults, quiet libraries, plain log lines. Safe to call more than once."""
    # Every library starts offline; lmtune.hub allows the network around a hub id's load when the
    # hub answers, unless the user set HF_HUB_OFFLINE themselves.
    if "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = os.environ[AUTO_MARKER] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # The tokenizers library's own threads fight the data workers and torch for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
