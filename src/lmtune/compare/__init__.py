"""`lmtune compare compare.yaml`: train variants of one config on the same data and seed, one after
another, and tabulate what each cost and how well it did.

    output_dir: saves/compare              # compare.md, compare.json, compare.png, a folder per variant
    base_config: examples/quickstart.yaml  # optional: the training YAML every variant starts from
    base: {max_steps: 30, val_size: 16}    # optional: keys over base_config's, for every variant
    variants:                              # a name plus any training keys
      - {name: lora}
      - {name: full, finetuning_type: full, learning_rate: 2.0e-5}
    score: contains                        # exact: the answer is the reference reply;
    score_expect: "{{name}}"               # contains: it holds score_expect ({{key}}: data_vars)

Each variant trains in its own child process, so the peak memory measured is its own: the peak
resident set size on a CPU, torch's peak allocated memory on a GPU. A variant that switches
finetuning_type leaves out the base's keys of other methods (a LoRA base's lora_rank means nothing
to full fine-tuning). After training, the child answers the val split's prompts greedily with the
saved output, loaded as `lmtune chat` loads it, for the task score.
"""

from __future__ import annotations

from pathlib import Path

from lmtune.compare.report import write_report
from lmtune.compare.runner import run_variant
from lmtune.compare.spec import CompareSpec, Variant, load_spec
from lmtune.errors import TrainingError

__all__ = ["CompareSpec", "Variant", "load_spec", "run_compare"]


def run_compare(path: str, overrides: list[str] | None = None) -> Path:
    spec, variants = load_spec(path, overrides or [])
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, variant in enumerate(variants, 1):
        print(f"\n== compare [{i}/{len(variants)}] {variant.name} ==", flush=True)
        rows.append(run_variant(variant, spec))
    report = write_report(path, spec, rows)
    print("\n" + report.read_text())
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        raise TrainingError(f"variant{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed; "
                            f"the others are in {report}.",
                            "see the error in the table (and the variant's output above), fix its "
                            "keys and run compare again.")
    return out
