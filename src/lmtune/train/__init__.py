"""Training stages; each maps a validated RunConfig to a finished run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmtune.config import RunConfig
from lmtune.train import dpo, kto, ppo, pt, rm, sft

STAGES: dict[str, Callable[[RunConfig], dict[str, Any]]] = {
    "pt": pt.run, "sft": sft.run, "rm": rm.run, "ppo": ppo.run, "dpo": dpo.run, "kto": kto.run}
