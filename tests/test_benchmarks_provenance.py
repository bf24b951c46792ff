"""Every measured number in BENCHMARKS.md and README.md comes from a file in benchmarks/results.

Each table of BENCHMARKS.md, and each `<!-- bench:NAME -->` section of either document, names its
JSON on a "Numbers from `benchmarks/results/X.json`" line. A table row's numbers (all but its first
cell, which names the variant) must all be found in one record of that JSON (a dict held in a list,
such as one variant's results), at the precision the table prints them; the rest of a section's text
is checked against the whole file. So a number typed by hand, or left over from an older run, fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = re.compile(r"benchmarks/results/([\w.-]+\.json)")
# 1,234.5 | 1234.5 | -0.04 | +0.20, not the 2 of SmolLM2 or int32; a trailing % marks a percentage
NUMBER = re.compile(r"(?<![\w.])([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(%?)")
SECTION = re.compile(r"<!-- bench:([\w-]+) -->\n(.*?)<!-- /bench:\1 -->", re.S)


def numbers(text: str) -> list[tuple[str, bool]]:
    """(number as printed, is a percentage) for each number in text."""
    return [(m.group(1), m.group(2) == "%") for m in NUMBER.finditer(text)]


def matches(printed: str, percent: bool, value: float) -> bool:
    """Whether `value` prints as `printed` at its precision (as a percentage of 1 too, for %)."""
    shown = float(printed.replace(",", ""))
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    candidates = [value, 100 * value] if percent else [value]
    return any(abs(c - shown) <= 0.5 * 10 ** -decimals + 1e-9 for c in candidates)


def leaves(data) -> list[float]:
    if isinstance(data, bool) or data is None or isinstance(data, str):
        return []
    if isinstance(data, (int, float)):
        return [data]
    items = data.values() if isinstance(data, dict) else data
    return [x for item in items for x in leaves(item)]


def records(data) -> list[list[float]]:
    """The numbers of each record (a dict held in a list) of a JSON document; the whole document
    where it has no such record."""
    found = []

    def walk(node, in_list: bool) -> None:
        if isinstance(node, dict):
            if in_list:
                found.append(leaves(node))
            for value in node.values():
                walk(value, False)
        elif isinstance(node, list):
            for value in node:
                walk(value, True)

    walk(data, False)
    return found or [leaves(data)]


def load_sources(line: str) -> list:
    names = SOURCE.findall(line)
    return [json.loads((ROOT / "benchmarks" / "results" / name).read_text()) for name in names]


def tables(text: str) -> list[tuple[int, list[list[str]], str]]:
    """(line number, data rows as cells, the first non-blank line after the table) of each table."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            after = next((line for line in lines[i:] if line.strip()), "")
            rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[start + 2: i]]
            out.append((start + 1, rows, after))
        else:
            i += 1
    return out


def table_problems(text: str, doc: str) -> list[str]:
    problems = []
    for line, rows, after in tables(text):
        if not SOURCE.search(after):
            problems.append(f"{doc}:{line}: the table names no benchmarks/results JSON on the line after it")
            continue
        candidates = [r for data in load_sources(after) for r in records(data)]
        for row in rows:
            wanted = [n for cell in row[1:] for n in numbers(cell)]
            if not any(all(any(matches(p, pct, x) for x in rec) for p, pct in wanted) for rec in candidates):
                missing = min(([p for p, pct in wanted if not any(matches(p, pct, x) for x in rec)]
                               for rec in candidates), key=len)
                problems.append(f"{doc}:{line}: row '{row[0]}': {', '.join(missing)} not in {after}")
    return problems


def section_problems(text: str, doc: str) -> list[str]:
    """The text of each bench section outside its tables, against the whole of its JSON."""
    problems = []
    for match in SECTION.finditer(text):
        body = match.group(2)
        prose = "\n".join(line for line in body.splitlines() if not line.startswith("|"))
        source = next((line for line in prose.splitlines() if SOURCE.search(line)), None)
        wanted = numbers(SOURCE.sub("", prose))
        if not wanted:
            continue
        if source is None:
            problems.append(f"{doc}: section {match.group(1)} has numbers but names no benchmarks/results JSON")
            continue
        values = [x for data in load_sources(source) for x in leaves(data)]
        missing = [p for p, pct in wanted if not any(matches(p, pct, x) for x in values)]
        if missing:
            problems.append(f"{doc}: section {match.group(1)}: {', '.join(missing)} not in {source}")
    return problems


def problems(benchmarks_md: str, readme: str) -> list[str]:
    return (table_problems(benchmarks_md, "BENCHMARKS.md") + section_problems(benchmarks_md, "BENCHMARKS.md")
            + section_problems(readme, "README.md"))


@pytest.fixture(scope="module")
def docs() -> tuple[str, str]:
    return (ROOT / "BENCHMARKS.md").read_text(), (ROOT / "README.md").read_text()


def test_every_published_number_is_in_the_json_its_table_names(docs):
    assert problems(*docs) == []


def test_the_documents_have_the_tables_and_sections_checked(docs):
    benchmarks_md, readme = docs
    assert len(tables(benchmarks_md)) >= 6
    assert {"sft_throughput", "packing_throughput", "data_plan", "data_encoding", "compare_methods",
            "stage_examples", "quickstart", "ppo_reference", "serve_throughput", "serve_memory",
            "predict_speed", "eval_sample"} <= {m.group(1) for m in SECTION.finditer(benchmarks_md)}
    assert {"stage_examples", "quickstart"} <= {m.group(1) for m in SECTION.finditer(readme)}


# bench.rewrite("DOC", "NAME", ...), or run_benchmark("NAME", ...), which rewrites NAME in BENCHMARKS.md
REWRITE = re.compile(r'\.rewrite\("([\w.]+)", "([\w-]+)"|run_benchmark\("()([\w-]+)"')


def body_of(text: str, name: str) -> str | None:
    """The text between a section's markers."""
    return next((m.group(2) for m in SECTION.finditer(text) if m.group(1) == name), None)


def test_every_section_a_script_rewrites_is_in_its_document_measured_or_marked_not_yet(docs):
    """A section is either written from its JSON or says which script will write it."""
    texts = dict(zip(("BENCHMARKS.md", "README.md"), docs))
    rewritten = {}
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for doc, name, _, benchmark in REWRITE.findall(script.read_text()):
            rewritten[(doc or "BENCHMARKS.md", name or benchmark)] = script.name
    assert {"serve_throughput", "serve_memory", "predict_speed", "eval_sample"} <= {n for _, n in rewritten}
    for (doc, name), script in rewritten.items():
        body = body_of(texts[doc], name)
        assert body is not None, f"{script} rewrites section {name}, which {doc} lacks"
        if doc == "BENCHMARKS.md":
            assert SOURCE.search(body) or body.startswith(
                f"Not measured on this version yet: `python benchmarks/{script}` writes"), (name, body)


SECTIONS = sorted({m.group(1) for m in SECTION.finditer((ROOT / "BENCHMARKS.md").read_text())})


@pytest.mark.parametrize("name", SECTIONS)
def test_a_hand_typed_number_in_any_section_fails_measured_or_not(docs, name):
    benchmarks_md, _ = docs
    opening = f"<!-- bench:{name} -->\n"
    typed_sentence = benchmarks_md.replace(opening, opening + "Batched serving is 1234.5678x faster.\n")
    assert any(name in p for p in section_problems(typed_sentence, "BENCHMARKS.md"))
    # a typed table under the section's own source line, where its JSON exists
    source = "\n".join(line for line in (body_of(benchmarks_md, name) or "").splitlines() if SOURCE.search(line))
    typed_table = benchmarks_md.replace(opening, opening + "| mode | tokens/s |\n| --- | ---: |\n"
                                        f"| batched | 1234.5678 |\n\n{source or 'no source'}\n\n")
    assert len(tables(typed_table)) == len(tables(benchmarks_md)) + 1
    assert len(table_problems(typed_table, "BENCHMARKS.md")) == len(table_problems(benchmarks_md, "BENCHMARKS.md")) + 1


def retyped(printed: str, shift: int) -> str:
    """The same number with its last digit moved by `shift` (as a hand edit or a stale value would)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    value = float(printed.replace(",", "")) + shift * 10 ** -decimals
    return f"{value:,.{decimals}f}" if "," in printed else f"{value:.{decimals}f}"


def test_a_retyped_number_in_any_table_cell_fails(docs):
    benchmarks_md, _ = docs
    lines = benchmarks_md.splitlines()
    checked = 0
    for line, rows, _ in tables(benchmarks_md):
        for offset, row in enumerate(rows):
            index = line + 1 + offset  # the row's 0-based line: header and alignment come first
            cells = lines[index].split("|")
            for c in range(2, len(cells) - 1):  # all but the first cell
                for match in NUMBER.finditer(cells[c]):
                    # A row's numbers are checked as a set against one record, so a retyped value
                    # may by chance be another number of that record: one of a few edits must show.
                    seen = []
                    for shift in (7, 13, 29):
                        edited = cells[:]
                        edited[c] = (cells[c][:match.start(1)] + retyped(match.group(1), shift)
                                     + cells[c][match.end(1):])
                        changed = lines[:index] + ["|".join(edited)] + lines[index + 1:]
                        seen.append(bool(table_problems("\n".join(changed), "BENCHMARKS.md")))
                    assert any(seen), (lines[index], cells[c])
                    checked += 1
    assert checked >= 100


def test_a_number_in_a_section_sentence_or_a_missing_source_fails(docs):
    benchmarks_md, _ = docs
    assert "Each variant trains 57 steps." in benchmarks_md
    assert section_problems(benchmarks_md.replace("trains 57 steps", "trains 75 steps"), "doc")
    unsourced = benchmarks_md.replace("Numbers from `benchmarks/results/ppo_reference.json`.", "")
    assert any("names no benchmarks/results JSON" in p for p in table_problems(unsourced, "doc"))
