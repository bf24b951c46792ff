"""DataReport: every count between the files on disk and the rows that train, so nothing is silent.

Per dataset: records found, what num_samples / max_samples / bad records / cutoff_len / the mix took
away and why, tokens per row; per split: rows and tokens; packing. `warnings()` says in plain words
what a user may not have meant; `lines()` is the summary that `lmtune plan` and `lmtune train` print.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LengthStats:
    """Rows, tokens and trained (target) tokens of a set of rows, with the row-length spread."""

    rows: int = 0
    tokens: int = 0
    target_tokens: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0
    max: int = 0

    @classmethod
    def of(cls, lengths: list[int], tokens: int, target_tokens: int) -> "LengthStats":
        if not lengths:
            return cls()
        ordered = sorted(lengths)

        def pct(p: float) -> int:  # nearest-rank percentile
            return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

        return cls(rows=len(ordered), tokens=tokens, target_tokens=target_tokens,
                   mean=round(sum(ordered) / len(ordered), 1), p50=pct(0.5), p95=pct(0.95),
                   max=ordered[-1])


@dataclass
class DatasetCounts:
    name: str
    file: str
    found: int = 0                     # records in the file(s)
    kept: int = 0                      # records that became training rows, after every step below
    num_samples: int | None = None     # dataset_info.json num_samples, when set
    dropped_by_num_samples: int = 0    # records the random sample left out
    repeated_by_num_samples: int = 0   # extra draws when num_samples exceeds the records
    dropped_by_max_samples: int = 0    # beyond the first max_samples
    bad: int = 0                       # skipped by skip_bad_records
    bad_examples: list[str] = field(default_factory=list)
    truncated: int = 0                 # rows cut to cutoff_len (kept, with a target left)
    dropped_over_long: int = 0         # rows over cutoff_len removed by cutoff_policy: drop
    dropped_no_target: int = 0         # rows with no target token within cutoff_len
    mixed: int | None = None           # rows an interleave mix_strategy took (None: concat)
    dropped_unfinished: int = 0        # replay answers left out: past the token limit, or empty
    unfilled_placeholders: list[str] = field(default_factory=list)
    cache: str = ""                    # encoded rows: "hit" (read from the cache) or "built"
    streamed: bool = False             # streaming: read while training runs, so nothing counted
    tokens: LengthStats = field(default_factory=LengthStats)

    @property
    def sampled(self) -> int:
        """Records after num_samples and max_samples: what was parsed."""
        base = self.num_samples if self.num_samples is not None else self.found
        return base - self.dropped_by_max_samples - self.dropped_unfinished


@dataclass
class PackingStats:
    samples: int = 0
    rows: int = 0
    tokens: int = 0
    capacity: int = 0

    @property
    def samples_per_row(self) -> float:
        return self.samples / self.rows if self.rows else 0.0

    @property
    def fill(self) -> float:
        return self.tokens / (self.rows * self.capacity) if self.rows else 0.0


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"


@dataclass
class DataReport:
    datasets: list[DatasetCounts] = field(default_factory=list)
    train: LengthStats = field(default_factory=LengthStats)
    val: LengthStats = field(default_factory=LengthStats)
    cutoff_len: int = 0
    max_samples: int | None = None
    kind: str = "conversation"
    mix_strategy: str = "concat"
    packing: PackingStats | None = None
    notes: list[str] = field(default_factory=list)  # template choices and other set-up findings
    streaming: bool = False  # the train split streams: its rows are not known up front

    def warnings(self) -> list[str]:
        """Plain-words warnings about data the user may not have meant to lose."""
        out = list(self.notes)
        capped = [d for d in self.datasets if d.dropped_by_max_samples]
        if capped:
            parts = [f"{d.sampled:,} of {d.sampled + d.dropped_by_max_samples:,} rows of {d.name} "
                     f"({_pct(d.sampled, d.sampled + d.dropped_by_max_samples)})" for d in capped]
            text = f"max_samples={self.max_samples} keeps the first " + ", ".join(parts)
            if len(self.datasets) > 1:
                found = sum(d.found for d in self.datasets)
                kept = sum(d.sampled for d in self.datasets)
                text += f"; {kept:,} of {found:,} in all ({_pct(kept, found)})"
            out.append(text)
        for d in self.datasets:
            out += self._dataset_warnings(d)
        if 0 < self.val.rows < 10:
            out.append(f"the val split has only {self.val.rows} rows")
        return out

    def _dataset_warnings(self, d: DatasetCounts) -> list[str]:
        out = []
        if d.dropped_by_num_samples:
            out.append(f"num_samples={d.num_samples} samples {d.num_samples:,} of {d.found:,} "
                       f"records of {d.name} at random")
        if d.repeated_by_num_samples:
            out.append(f"num_samples={d.num_samples} draws {d.num_samples:,} rows from the "
                       f"{d.found:,} records of {d.name}: {d.repeated_by_num_samples:,} are repeats")
        if d.bad:
            out.append(f"skip_bad_records skipped {d.bad:,} bad records of {d.name} (first: "
                       f"{d.bad_examples[0]})")
        if d.unfilled_placeholders:
            keys = ", ".join("{{" + k + "}}" for k in d.unfilled_placeholders)
            out.append(f"{d.name} contains {keys} with no value in data_vars; they train as "
                       "literal text")
        encoded = d.sampled - d.bad
        if d.truncated:
            out.append(f"cutoff_len={self.cutoff_len} truncates {d.truncated:,} of {encoded:,} rows "
                       f"of {d.name} ({_pct(d.truncated, encoded)})")
        if d.dropped_over_long:
            out.append(f"cutoff_len={self.cutoff_len} with cutoff_policy: drop removes "
                       f"{d.dropped_over_long:,} of {encoded:,} rows of {d.name} "
                       f"({_pct(d.dropped_over_long, encoded)})")
        if d.dropped_no_target:
            out.append(f"cutoff_len={self.cutoff_len} leaves {d.dropped_no_target:,} rows of {d.name} "
                       "without a response token; they were dropped")
        if d.mixed is not None and d.mixed < d.kept:
            out.append(f"mix_strategy={self.mix_strategy} uses only {d.mixed:,} of the {d.kept:,} rows "
                       f"of {d.name}")
        elif d.mixed is not None and d.mixed > d.kept:
            out.append(f"mix_strategy={self.mix_strategy} draws {d.mixed:,} rows from the {d.kept:,} of "
                       f"{d.name}: {d.mixed - d.kept:,} are repeats")
        return out

    def lines(self) -> list[str]:
        """The human summary: per dataset, per split, packing."""
        lines = []
        for d in self.datasets:
            if d.streamed:
                lines.append(f"dataset {d.name}" + (f" ({d.file})" if d.file != d.name else "")
                             + ": streamed; its records and tokens are not known up front")
                continue
            where = [d.file] if d.file != d.name else []
            where += ["encoded rows from cache"] if d.cache == "hit" else []
            lines.append(f"dataset {d.name}" + (f" ({', '.join(where)})" if where else ""))
            gone = [(d.dropped_by_num_samples, "num_samples"), (d.dropped_by_max_samples, "max_samples"),
                    (d.bad, "bad"), (d.dropped_over_long, "over-long"),
                    (d.dropped_no_target, "no target"), (d.dropped_unfinished, "unfinished")]
            why = ", ".join(f"{n:,} {reason}" for n, reason in gone if n)
            lines.append(f"  records: {d.found:,} found, {d.kept:,} kept"
                         + (f" (dropped: {why})" if why else "")
                         + (f"; {d.repeated_by_num_samples:,} repeated by num_samples"
                            if d.repeated_by_num_samples else "")
                         + (f"; the mix takes {d.mixed:,}" if d.mixed is not None else ""))
            t = d.tokens
            lines.append(f"  tokens per row: mean {t.mean:,.0f}, p50 {t.p50:,}, p95 {t.p95:,}, max "
                         f"{t.max:,}; {t.tokens:,} tokens, {t.target_tokens:,} trained; "
                         f"{d.truncated:,} truncated")
        if self.streaming:
            lines.append("train: streamed while training runs; rows and tokens are counted as they "
                         "train (trainer_log.jsonl), not up front")
        for split, s in (("train", self.train), ("val", self.val)):
            if s.rows:
                lines.append(f"{split}: {s.rows:,} rows, {s.tokens:,} tokens, {s.target_tokens:,} "
                             "trained")
        if self.packing:
            p = self.packing
            lines.append(f"packing: {p.samples:,} samples in {p.rows:,} rows of up to "
                         f"{p.capacity:,} tokens ({p.samples_per_row:.1f} per row, {100 * p.fill:.0f}% "
                         "full)")
        return lines

    def show(self) -> None:
        """Print the summary and the warnings, as `lmtune train` does before training."""
        for line in self.lines():
            print(line)
        for warning in self.warnings():
            print(f"warning: {warning}")

    def to_dict(self) -> dict:
        payload = asdict(self)
        if self.streaming:  # no totals were counted, so none are written
            payload["train"] = None
            payload["datasets"] = [{"name": d.name, "file": d.file, "streamed": True} if d.streamed
                                   else row for d, row in zip(self.datasets, payload["datasets"])]
        if self.packing:
            payload["packing"] |= {"samples_per_row": round(self.packing.samples_per_row, 3),
                                   "fill": round(self.packing.fill, 4)}
        return payload | {"warnings": self.warnings()}

    def save(self, path: Path) -> None:
        from lmtune.durable import write_file

        write_file(path, json.dumps(self.to_dict(), indent=2), "the data report")
