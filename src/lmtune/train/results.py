"""all_results.json and run_config.yaml: what a finished run leaves next to its model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lmtune.train.checkpoint import RUN_CONFIG

RESULTS_FILE = "all_results.json"


def write_results(output_dir: Path, results: dict[str, Any], run_config: dict[str, Any]) -> None:
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    (output_dir / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
