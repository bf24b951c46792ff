"""all_results.json and run_config.yaml: what a finished run leaves next to its model. They are
the last files a run writes, so writing them also marks the output folder complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lmtune.durable import write_file
from lmtune.train.checkpoint import RUN_CONFIG, mark_complete

RESULTS_FILE = "all_results.json"


def write_results(output_dir: Path, results: dict[str, Any], run_config: dict[str, Any]) -> None:
    write_file(output_dir / RESULTS_FILE, json.dumps(results, indent=2), "the run's results")
    write_file(output_dir / RUN_CONFIG, yaml.safe_dump(run_config, sort_keys=False), "the run's config")
    mark_complete(output_dir)
