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
    eval_task: mmlu_sample_test            # optional: a benchmark column, as `lmtune eval` scores
    task_dir: data                         #   it (with n_shot, lang, batch_size), base model too

A variant may carry `sweep: {learning_rate: [1.0e-4, 5.0e-4]}`: each value (each combination, for
several keys) trains in output_dir/<name>/<key>=<value>, and the table shows the variant at its best
point - the highest task score, then the lowest eval loss; compare.json keeps every point.

Each variant trains in its own child process, so the peak memory measured is its own: the peak
resident set size on a CPU, torch's peak allocated memory on a GPU. A variant that switches
finetuning_type leaves out the base's keys of other methods (a LoRA base's lora_rank means nothing
to full fine-tuning). After training, the child answers the val split's prompts greedily with the
saved output, loaded as `lmtune chat` loads it, for the task score.
"""

from __future__ import annotations

from pathlib import Path

from lmtune.compare.report import write_report
from lmtune.compare.runner import run_base_eval, run_compared
from lmtune.compare.spec import CompareSpec, Variant, load_spec
from lmtune.errors import TrainingError

__all__ = ["CompareSpec", "Variant", "load_spec", "run_compare"]


def run_compare(path: str, overrides: list[str] | None = None) -> Path:
    spec, variants = load_spec(path, overrides or [])
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases: dict[str, dict] = {}
    if spec.eval_task:  # each model the variants start from, as it is before training
        for variant in variants:
            model = _base_model(variant.config)
            if model not in bases:
                print(f"\n== compare: {spec.eval_task} of the base model {model} ==", flush=True)
                bases[model] = run_base_eval(variant.config, spec, f"base {model}")
    runs = sum(max(1, len(v.points)) for v in variants)
    done = 0

    def announce(name: str) -> None:
        nonlocal done
        done += 1
        print(f"\n== compare [{done}/{runs}] {name} ==", flush=True)

    rows = []
    for variant in variants:
        row = run_compared(variant, spec, announce)
        if spec.eval_task:
            row["base_model"] = _base_model(variant.config)
            _add_delta(row, bases[row["base_model"]])
            for point in row.get("sweep", {}).get("points", []):
                _add_delta(point, bases[row["base_model"]])
        rows.append(row)
    report = write_report(path, spec, rows, bases)
    print("\n" + report.read_text())
    failed = [f"variant {r['name']}" for r in rows if r["status"] != "ok"]
    failed += [f"the benchmark of the base model {m}" for m, b in bases.items() if "error" in b]
    if failed:
        raise TrainingError(f"{', '.join(failed)} failed; "
                            f"the others are in {report}.",
                            "see the error in the table (and the variant's output above), fix its "
                            "keys and run compare again.")
    return out


def _base_model(config: dict) -> str:
    adapters = config.get("adapter_name_or_path")
    return str(config.get("model_name_or_path")) + (f" + {adapters}" if adapters else "")


def _add_delta(row: dict, base: dict) -> None:
    """The benchmark accuracy's change against the base model's, in percentage points."""
    if row.get("benchmark") and "accuracy" in base:
        row["benchmark"]["delta"] = round(row["benchmark"]["accuracy"] - base["accuracy"], 4)
