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

import difflib
import json
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmtune.config import (RunConfig, build_config, check_training_inputs, keys_for_other_methods,
                           parse_overrides, read_yaml)
from lmtune.errors import ConfigError, LmtuneError, TrainingError

REPORT_MD, REPORT_JSON, REPORT_PNG = "compare.md", "compare.json", "compare.png"
RESULT_FILE = "compare_variant.json"  # what a child measured, in its variant's folder
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class CompareSpec(BaseModel):
    """compare.yaml. Each field's description is its documentation."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field(description="Folder for compare.md/json/png and one folder per variant.")
    base_config: str | None = Field(None, description="Training YAML every variant starts from.")
    base: dict[str, Any] = Field(default_factory=dict,
                                 description="Training keys for every variant, over base_config's.")
    variants: list[dict[str, Any]] = Field(
        min_length=1, description="Each a `name` plus the training keys it changes.")
    score: Literal["exact", "contains"] = Field(
        "exact", description="exact: the answer equals the reference reply (whitespace aside); "
        "contains: it holds score_expect, on the val rows whose reference holds it.")
    score_expect: str | None = Field(
        None, description="contains: the text a right answer holds; {{key}} from data_vars.")
    score_max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per answer.")


class Variant(BaseModel):
    name: str
    keys: dict[str, Any]  # what the variant itself sets
    values: dict[str, Any]  # its complete training config
    left_out: list[str]  # base keys of other methods


def load_spec(path: str, overrides: list[str]) -> tuple[CompareSpec, list[Variant]]:
    """Read compare.yaml and validate every variant's training config before anything trains.
    `overrides` (key=value) apply to the base."""
    raw = read_yaml(path)
    known = list(CompareSpec.model_fields)
    for key in raw:
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(f"{path}: unknown key '{key}'.",
                              f"did you mean '{guess[0]}'?" if guess else f"use {', '.join(known)}.")
    try:
        spec = CompareSpec(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg'].lower()}",
                          "see the example in examples/compare_methods.yaml.") from None
    if spec.score == "contains" and not spec.score_expect:
        raise ConfigError(f"{path}: score: contains needs score_expect.",
                          "add e.g. score_expect: '{{name}}' (filled from data_vars).")
    base = read_yaml(spec.base_config) if spec.base_config else {}
    base |= spec.base
    base |= parse_overrides(overrides)
    return spec, [_variant(path, spec, base, raw) for raw in _unique(path, spec.variants)]


def _unique(path: str, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = [str(v.get("name", "")) for v in variants]
    for name in names:
        if not _NAME.match(name) or name in (REPORT_MD, REPORT_JSON, REPORT_PNG):
            raise ConfigError(f"{path}: variant name {name!r} cannot name a folder in output_dir.",
                              "give each variant a name of letters, digits and _ . + -, e.g. lora-r16.")
        if names.count(name) > 1:
            raise ConfigError(f"{path}: two variants are named {name}.", "give each a unique name.")
    return variants


def _variant(path: str, spec: CompareSpec, base: dict[str, Any], raw: dict[str, Any]) -> Variant:
    keys = {k: v for k, v in raw.items() if k != "name"}
    if "output_dir" in keys:
        raise ConfigError(f"{path}: variant {raw['name']} sets output_dir.",
                          "remove it: each variant trains in output_dir/<name>.")
    method = keys.get("finetuning_type", base.get("finetuning_type", "lora"))
    foreign = keys_for_other_methods(str(method))
    left_out = sorted(k for k in base if k in foreign and k not in keys)
    values = {k: v for k, v in base.items() if k not in left_out} | keys
    values |= {"output_dir": str(Path(spec.output_dir) / raw["name"]), "overwrite_output_dir": True}
    where = f"{path}: variant {raw['name']}"
    try:
        check_training_inputs(build_config(values, source=where))
    except ConfigError as exc:  # key and type errors name their source already; combinations not
        message = exc.message if exc.message.startswith(where) else f"{where}: {exc.message}"
        raise ConfigError(message, exc.fix) from None
    return Variant(name=raw["name"], keys=keys, values=values, left_out=left_out)


# --- one variant, in a child process ----------------------------------------------------------------

def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def _normalise(text: str) -> str:
    return " ".join(text.split())


def task_score(cfg: RunConfig, mode: str, expect: str | None, max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of the trained output to the val split's prompts, and how many are right."""
    from peft import PeftModel

    from lmtune.data.formats import Conversation, fill_placeholders
    from lmtune.data.sources import load_conversations, split_validation
    from lmtune.infer.chat import ChatSession
    from lmtune.models.methods import MERGEABLE

    conversations, _ = load_conversations(cfg)
    _, val = split_validation(conversations, cfg.val_size, cfg.seed)
    items = [(c.messages[:-1], c.messages[-1]["content"]) for c in val
             if c.messages and c.messages[-1]["role"] == "assistant"]
    if expect is not None:
        holder = Conversation([{"role": "user", "content": expect}])
        fill_placeholders(holder, cfg.data_vars)
        expect = holder.messages[0]["content"]
        items = [(prompt, ref) for prompt, ref in items if expect.lower() in ref.lower()]
    result: dict[str, Any] = {"mode": mode, "expect": expect, "hits": 0, "total": len(items),
                              "answers": []}
    if not items:
        return result
    session = ChatSession.from_config(cfg.model_copy(update={"max_new_tokens": max_new_tokens}))
    if isinstance(session.model, PeftModel) and session.model.active_peft_config.peft_type in MERGEABLE:
        # The same function, merged into the full-precision base chat loads: without it DoRA would
        # recompute every weight's norm for every generated token (minutes per variant on a CPU).
        session.model = session.model.merge_and_unload()
    single = [p[0]["content"] for p, _ in items if len(p) == 1 and p[0]["role"] == "user"]
    if len(single) == len(items):  # one user message each: generated together, left-padded
        answers = [a for i in range(0, len(single), 8) for a in session.reply_batch(single[i: i + 8])]
    else:
        answers = [session.reply(prompt, sample=False, stream=False) for prompt, _ in items]
    for (prompt, reference), answer in zip(items, answers):
        hit = (expect.lower() in answer.lower() if mode == "contains"
               else _normalise(answer) == _normalise(reference))
        result["hits"] += hit
        result["answers"].append({"prompt": prompt[-1]["content"], "answer": answer, "hit": hit})
    return result


def _child_main(job_json: str) -> int:
    """`python -m lmtune.compare JOB`: train one variant, measure it, score it."""
    from lmtune.runtime import configure
    from lmtune.train import STAGES

    configure()
    job = json.loads(job_json)
    result_path = Path(job["result"])
    try:
        cfg = build_config(job["config"], source=f"variant {job['name']}")
        start = time.perf_counter()
        STAGES[cfg.stage](cfg)
        measured: dict[str, Any] = {"wall_s": round(time.perf_counter() - start, 2),
                                    "peak_rss_bytes": _peak_rss_bytes(), "device": _device()}
        import torch

        if torch.cuda.is_available():
            measured["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        measured["score"] = task_score(cfg, **job["score"])
    except LmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps({"error": str(exc)}))
        return 2
    result_path.write_text(json.dumps(measured, indent=2))
    return 0


def run_variant(variant: Variant, spec: CompareSpec) -> dict[str, Any]:
    folder = Path(variant.values["output_dir"])
    result_path = folder / RESULT_FILE
    result_path.unlink(missing_ok=True)  # never report an earlier run's numbers
    job = {"name": variant.name, "config": variant.values, "result": str(result_path),
           "score": {"mode": spec.score, "expect": spec.score_expect,
                     "max_new_tokens": spec.score_max_new_tokens}}
    code = subprocess.run([sys.executable, "-m", "lmtune.compare", json.dumps(job)]).returncode
    if code in (130, -signal.SIGINT):  # Ctrl-C reached the child too: stop the comparison
        raise KeyboardInterrupt
    row: dict[str, Any] = {"name": variant.name, "keys": variant.keys, "left_out": variant.left_out,
                           "finetuning_type": variant.values.get("finetuning_type", "lora")}
    measured = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if code != 0 or "error" in measured:
        return row | {"status": "failed",
                      "error": measured.get("error") or f"the child process exited with code {code}"}
    return row | {"status": "ok"} | _collect(folder, measured)


def _collect(folder: Path, measured: dict[str, Any]) -> dict[str, Any]:
    from lmtune.train.logs import LOG_FILE, read_log
    from lmtune.train.results import RESULTS_FILE

    results = json.loads((folder / RESULTS_FILE).read_text())
    records = read_log(folder / LOG_FILE)
    losses = [[r["step"], r["loss"]] for r in records if "loss" in r]
    gib = 1024 ** 3
    return {
        "trainable_params": results["trainable_params"], "total_params": results["total_params"],
        "trainable_pct": round(100 * results["trainable_params"] / results["total_params"], 4),
        "peak_rss_gib": round(measured["peak_rss_bytes"] / gib, 3),
        "peak_gpu_gib": round(measured["peak_gpu_bytes"] / gib, 3) if "peak_gpu_bytes" in measured
        else None,
        "wall_s": measured["wall_s"], "train_runtime_s": results["train_runtime"],
        "train_tokens_per_second": results["train_tokens_per_second"],
        "final_train_loss": losses[-1][1] if losses else None,
        "mean_train_loss": round(results["train_loss"], 6), "eval_loss": results.get("eval_loss"),
        "score": measured["score"],
        "size_mb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6,
        "steps": results["global_step"], "device": measured["device"],
        "loss_curve": losses,
        "eval_curve": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
    }


# --- the report ---------------------------------------------------------------------------------

def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _score_cell(row: dict[str, Any]) -> str:
    score = row["score"]
    return f"{score['hits']}/{score['total']}" if score["total"] else "-"


def _memory(row: dict[str, Any]) -> float:
    return row["peak_gpu_gib"] if row["peak_gpu_gib"] is not None else row["peak_rss_gib"]


def markdown(path: str, spec: CompareSpec, rows: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    gpu = any(r["peak_gpu_gib"] is not None for r in ok)
    memory = "peak GPU GiB" if gpu else "peak RSS GiB"
    lines = [f"# lmtune compare: {path}", "",
             f"Base: {spec.base_config or 'no base_config'}"
             + (f" with {', '.join(f'{k}: {v}' for k, v in spec.base.items())}" if spec.base else "")
             + f". {len(rows)} variants, one after another, each in its own process"
             + (f", on {ok[0]['device']}." if ok else "."), "",
             f"| variant | method | trainable params | trainable % | {memory} | wall s | train tokens/s "
             "| final train loss | eval loss | task score | size MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['finetuning_type']} | failed: {r['error'].splitlines()[0]} "
                         "| | | | | | | | |")
            continue
        lines.append(" | ".join([
            f"| {r['name']}", r["finetuning_type"], _cell(r["trainable_params"]),
            _cell(r["trainable_pct"], 2), _cell(_memory(r), 2), _cell(r["wall_s"], 1),
            _cell(r["train_tokens_per_second"], 1), _cell(r["final_train_loss"], 4),
            _cell(r["eval_loss"], 4), _score_cell(r), f"{r['size_mb']:.3g}"]) + " |")
    scored = next((r["score"] for r in ok if r["score"]["total"]), None)
    how = ("answers equal to the reference reply (whitespace aside)" if spec.score == "exact" else
           f"answers that contain \"{scored['expect'] if scored else spec.score_expect}\", among the "
           "val rows whose reference reply contains it")
    lines += ["", "Variants (keys over the base):"]
    lines += [f"- {r['name']}: " + (", ".join(f"{k}: {v}" for k, v in r["keys"].items()) or "the base")
              + (f" (base keys left out: {', '.join(r['left_out'])})" if r["left_out"] else "")
              for r in rows]
    lines += ["", "How each number is measured:",
              f"- {memory}: " + ("torch's peak allocated GPU memory in the variant's process."
                                 if gpu else "the variant process's peak resident set size, Python "
                                 "and the libraries included (the same for every variant)."),
              "- wall s: loading, encoding, training and saving, in the variant's process; train "
              "tokens/s: non-padding tokens per second of the training loop.",
              "- final train loss: the last logged window; eval loss: on the val split after training.",
              f"- task score: {how}; greedy answers (at most {spec.score_max_new_tokens} new tokens) "
              "of the saved output, loaded as `lmtune chat` loads it (a quantized run's adapter on "
              "the full-precision base; weight adapters merged into it).",
              "- size MB: the saved weights (adapter or whole model), safetensors."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Train loss curves overlaid; bars for peak memory and training speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (loss_ax, mem_ax, speed_ax) = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110,
                                                    gridspec_kw={"width_ratios": [1.6, 1, 1]})
    for r in ok:
        if r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            loss_ax.plot(steps, losses, linewidth=1.6, label=r["name"])
    loss_ax.set(xlabel="step", ylabel="train loss", title="train loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    names = [r["name"] for r in ok]
    for ax, values, title in ((mem_ax, [_memory(r) for r in ok], "peak memory (GiB)"),
                              (speed_ax, [r["train_tokens_per_second"] for r in ok],
                               "train tokens/s")):
        bars = ax.bar(names, values, color="#3b7dd8")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_compare(path: str, overrides: list[str] | None = None) -> Path:
    spec, variants = load_spec(path, overrides or [])
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, variant in enumerate(variants, 1):
        print(f"\n== compare [{i}/{len(variants)}] {variant.name} ==", flush=True)
        rows.append(run_variant(variant, spec))
    (out / REPORT_JSON).write_text(json.dumps({"spec": spec.model_dump(), "variants": rows}, indent=2))
    (out / REPORT_MD).write_text(markdown(path, spec, rows))
    plot(rows, out / REPORT_PNG)
    print("\n" + (out / REPORT_MD).read_text())
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        raise TrainingError(f"variant{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed; "
                            f"the others are in {out / REPORT_MD}.",
                            "see the error in the table (and the variant's output above), fix its "
                            "keys and run compare again.")
    return out


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
