"""DataReport: every count between the files on disk and the rows that train, so nothing is silent."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class DatasetCounts:
    name: str
    file: str
    found: int = 0
    kept: int = 0
    dropped_by_max_samples: int = 0
    unfilled_placeholders: list[str] = field(default_factory=list)


@dataclass
class EncodeCounts:
    rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0


@dataclass
class DataReport:
    datasets: list[DatasetCounts] = field(default_factory=list)
    train: EncodeCounts = field(default_factory=EncodeCounts)
    val: EncodeCounts = field(default_factory=EncodeCounts)
    cutoff_len: int = 0
    max_samples: int | None = None

    def warnings(self) -> list[str]:
        """Plain-words warnings about data the user may not have meant to lose."""
        out = []
        found = sum(d.found for d in self.datasets)
        kept = sum(d.kept for d in self.datasets)
        for d in self.datasets:
            if d.dropped_by_max_samples:
                out.append(f"max_samples={self.max_samples} keeps {d.kept:,} of {d.found:,} records of "
                           f"{d.name} ({100 * d.kept / d.found:.1f}%)")
            if d.unfilled_placeholders:
                keys = ", ".join("{{" + k + "}}" for k in d.unfilled_placeholders)
                out.append(f"{d.name} contains {keys} with no value in data_vars; they train as "
                           "literal text")
        if kept < found and len(self.datasets) > 1:
            out.append(f"{kept:,} of {found:,} records in all")
        for split, counts in (("train", self.train), ("val", self.val)):
            if counts.dropped_no_target:
                out.append(f"cutoff_len={self.cutoff_len} left {counts.dropped_no_target:,} {split} "
                           "rows with no response token; they were dropped")
            if counts.truncated:
                out.append(f"cutoff_len={self.cutoff_len} truncated {counts.truncated:,} {split} rows")
        if 0 < self.val.rows < 10:
            out.append(f"the val split has only {self.val.rows} rows")
        return out

    def summary_lines(self) -> list[str]:
        lines = []
        for d in self.datasets:
            lines.append(f"dataset {d.name} ({d.file}): {d.found:,} records, {d.kept:,} kept")
        for split, c in (("train", self.train), ("val", self.val)):
            if c.rows or c.dropped_no_target:
                lines.append(f"{split}: {c.rows:,} rows, {c.tokens:,} tokens, {c.target_tokens:,} "
                             f"trained tokens, {c.truncated:,} truncated, {c.dropped_no_target:,} "
                             "dropped (no response token left)")
        return lines

    def save(self, path: Path) -> None:
        payload = asdict(self) | {"warnings": self.warnings()}
        path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
