"""Memory levers, torchtune-style: each lever's tokens/s and peak RSS against the run without it.

The quickstart config (default model, LoRA r=8 on all linear layers, batch 8, cutoff 512) trains the
same number of steps per row, each row in its own child process, one after another. Rows add one
lever each to the row above: fp32 everywhere on glibc's malloc, then mimalloc (lmtune's default
allocator), then the chunked output head and loss (`chunked_cross_entropy`, on by default), then
the frozen base stored in bf16 while computing in fp32 (`frozen_dtype: bfloat16`),
then bf16 autocast (the quickstart as shipped: autocast keeps the base in bf16), then gradient
checkpointing. The `runtime` row is a process that imports what `lmtune train` imports and loads the
default model's tokenizer, nothing more: the floor under every run, and `lmtune plan`'s
RUNTIME_GIB. Each training row also carries `lmtune plan`'s estimate of its peak for the same
config.

Four levers have no key, as they change no number a run computes: the Llama-style MLP that keeps
gate and up only (models/gated_mlp.py), the norms' outputs and the MLP's product made again in
backward where no autocast casts them (models/recompute.py), grouped-query keys and values handed to
sdpa unrepeated on the CPU, and mimalloc's arenas committing memory as pages are used. The second
table takes the fp32-compute row with the bf16 frozen base (the configuration that meets issue
#13's goal on the peers job) and runs it as lmtune ships and once without each of the four,
alternated over the repeats (medians): without the MLP or the recomputation through a child that
patches its module before the command imports the training loop, the other two through their
settings (TRANSFORMERS_SDPA_FORCE_GQA=0, and mimalloc's default MIMALLOC_ARENA_EAGER_COMMIT=2).
A third table does the same on the quickstart as shipped (bf16 autocast) for the levers that act
there: the recomputation (of autocast's bf16 copies of the norms' outputs, and of the product) and
plain LoRA layers taking a bf16 input as it is (models/lora_inputs.py).

A fourth table trains the same job on the default model saved in bf16 (as most published checkpoints
are) in fp32 compute: `frozen_dtype: auto` keeps the frozen base in the checkpoint's bf16, each layer
casting its weight up as it computes, against `frozen_dtype: float32`, which widens it at load as
LLaMA-Factory does without bf16; fp32 arithmetic on the same values either way (the losses agree to
rounding), alternated over the repeats.

    python benchmarks/memory_levers.py     # writes benchmarks/results/memory_levers*.json and
                                           # their tables in BENCHMARKS.md
    python benchmarks/memory_levers.py --only always-on   # one table (levers, always-on,
                        # always-on-autocast, checkpoint-dtype); the others keep their JSON
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from _harness import ROOT, Bench, lmtune, run_child, source_line, table

QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")
# (name, what it adds, overrides): each row is the row above plus one lever.
LEVERS = [
    ("fp32", "fp32 weights and compute on glibc's malloc (no lever)",
     ["bf16=false", "frozen_dtype=float32", "allocator=system", "chunked_cross_entropy=false"]),
    ("+ mimalloc", "mimalloc as the process's allocator (lmtune's default)",
     ["bf16=false", "frozen_dtype=float32", "chunked_cross_entropy=false"]),
    ("+ chunked cross-entropy", "the output head and its loss a chunk of targets at a time (default)",
     ["bf16=false", "frozen_dtype=float32"]),
    ("+ bf16 frozen base, fp32 compute", "frozen base stored in bf16, cast up by each layer",
     ["bf16=false", "frozen_dtype=bfloat16"]),
    ("+ bf16 autocast", "matmuls in bf16 on the bf16 base (the quickstart as shipped)", ["bf16=true"]),
    ("+ gradient checkpointing", "recompute each layer's activations in backward",
     ["bf16=true", "gradient_checkpointing=true"]),
]


ALWAYS_ON_BASE = ["bf16=false", "frozen_dtype=bfloat16"]
# The training command with transformers' own MLP forward: the gated-MLP lever left out (patched in
# its own module, which imports nothing heavy, before the command imports the training loop).
PLAIN_MLP = ("import sys; import lmtune.models.gated_mlp as gated; "
             "gated.keep_less_in_gated_mlps = lambda model: 0; "
             "from lmtune.cli import main; sys.exit(main())")
# The training command keeping every norm output and MLP product (the recomputation left out the
# same way).
KEPT_OUTPUTS = ("import contextlib, sys; import lmtune.models.recompute as recompute; "
                "recompute.recomputing_cheap_outputs = contextlib.nullcontext; "
                "from lmtune.cli import main; sys.exit(main())")
# (name, what is left out, command prefix, environment)
ALWAYS_ON = [
    ("as shipped", "nothing", None, {}, []),
    ("without the lighter MLP", "silu's output kept for backward (transformers' forward)",
     [sys.executable, "-c", PLAIN_MLP], {}, []),
    ("without recomputed norm outputs and product", "norm outputs and silu(gate) * up kept for "
     "backward", [sys.executable, "-c", KEPT_OUTPUTS], {}, []),
    ("without unrepeated keys and values", "keys and values repeated to every head for sdpa",
     None, {"TRANSFORMERS_SDPA_FORCE_GQA": "0"}, []),
    ("without on-use arena commit", "mimalloc's default arena commit",
     None, {"MIMALLOC_ARENA_EAGER_COMMIT": "2"}, []),
]
# The training command with peft's own LoRA input handling (the as-is inputs left out the same way).
WIDENED_INPUTS = ("import sys; import lmtune.models.lora_inputs as inputs; "
                  "inputs.pass_half_inputs_as_they_are = lambda model: 0; "
                  "from lmtune.cli import main; sys.exit(main())")
# The quickstart as shipped (bf16 autocast): the levers that act there (same entries)
ALWAYS_ON_AUTOCAST = [
    ("as shipped", "nothing", None, {}, []),
    ("without recomputed norm outputs and product", "autocast's copies of the norm outputs and "
     "silu(gate) * up kept for backward", [sys.executable, "-c", KEPT_OUTPUTS], {}, []),
    ("without LoRA inputs as they are", "peft widens a bf16 input to fp32 and autocast narrows "
     "it again, a copy kept", [sys.executable, "-c", WIDENED_INPUTS], {}, []),
    ("without the bounded oneDNN cache", "oneDNN's default of 1,024 compiled matmuls kept",
     None, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}, []),
]
# A bf16 checkpoint trained in fp32 compute (same entries)
CHECKPOINT_DTYPE = [
    ("frozen_dtype: auto", "the frozen base kept in the checkpoint's bf16, each layer computing in "
     "fp32", None, {}, ["frozen_dtype=auto"]),
    ("frozen_dtype: float32", "the base widened to fp32 at load (as LLaMA-Factory loads it without "
     "bf16)", None, {}, ["frozen_dtype=float32"]),
]


def runtime_child(model: str) -> None:
    """In the child process: the imports of a training run and the tokenizer, then exit. As
    `lmtune train` does for a run without quantization, bitsandbytes stays out."""
    from lmtune import measure
    from lmtune.config import build_config
    from lmtune.models.load import load_tokenizer, resolve_model
    from lmtune.runtime import leave_out_bitsandbytes

    leave_out_bitsandbytes(build_config({"model_name_or_path": model}))
    from lmtune.train import sft  # noqa: F401  (what `lmtune train` imports for the default stage)

    measure.report_peak_rss_at_exit()
    load_tokenizer(resolve_model(model))


def plan_total(bench: Bench, overrides: list[str]) -> float:
    out = bench.scratch / "plan.json"
    with open(out, "w") as handle:
        subprocess.run(lmtune("plan", QUICKSTART, *overrides, "--json"), stdout=handle, check=True,
                       cwd=ROOT)
    return json.loads(out.read_text())["model"]["memory_gib"]["total"]


def measure(bench: Bench, steps: int) -> list[dict]:
    runtime = run_child([sys.executable, __file__, "--runtime-child", bench.model],
                        bench.scratch / "runtime.log")
    rows = [{"lever": "runtime", "adds": "Python, torch, transformers, peft, the tokenizer",
             "peak_rss_gib": runtime.peak_rss_gib}]
    for name, adds, overrides in LEVERS:
        out = bench.scratch / f"run-{len(rows)}"
        args = [*overrides, f"output_dir={out}", f"max_steps={steps}", "logging_steps=1000",
                "plot_loss=false", "save_steps=100000", "overwrite_output_dir=true",
                *bench.model_overrides()]
        run = run_child(lmtune("train", QUICKSTART, *args), out.with_suffix(".log"))
        results = json.loads((out / "all_results.json").read_text())
        rows.append({"lever": name, "adds": adds, "steps": steps,
                     "tokens_per_second": results["train_tokens_per_second"],
                     "peak_rss_gib": run.peak_rss_gib, "wall_s": run.wall_s,
                     "mean_train_loss": round(results["train_loss"], 4),
                     "plan_estimate_gib": plan_total(bench, args)})
    for before, row in zip(rows[1:2] + rows[1:], rows[1:]):  # the first run against itself
        row["speed_vs_previous"] = round(row["tokens_per_second"] / before["tokens_per_second"], 3)
        row["memory_vs_previous"] = round(row["peak_rss_gib"] / before["peak_rss_gib"], 3)
    return rows


def measure_variants(bench: Bench, steps: int, repeats: int, base: list[str],
                     variants: list[tuple[str, str, list[str] | None, dict, list[str]]]) -> dict:
    """Each variant (name, what it differs in, command prefix, environment, overrides) of the
    quickstart job with `base` overrides, alternated over the repeats; medians, each against the
    first variant."""
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    for repeat in range(repeats):
        for name, _, prefix, env, overrides in variants:
            out = bench.scratch / f"variant-{repeat}-{name.replace(' ', '-').replace(':', '')}"
            args = [*base, *overrides, f"output_dir={out}", f"max_steps={steps}",
                    "logging_steps=1000", "plot_loss=false", "save_steps=100000",
                    "overwrite_output_dir=true", *bench.model_overrides()]
            command = (prefix or lmtune()) + ["train", QUICKSTART, *args]
            run = run_child(command, out.with_suffix(".log"), env=env)
            results = json.loads((out / "all_results.json").read_text())
            runs[name].append({"tokens_per_second": results["train_tokens_per_second"],
                               "peak_rss_gib": run.peak_rss_gib,
                               "mean_train_loss": round(results["train_loss"], 4)})
            print(f"{name} #{repeat}: {run.peak_rss_gib:.2f} GiB, "
                  f"{results['train_tokens_per_second']:.1f} tokens/s", flush=True)
    rows = []
    for name, differs, *_ in variants:
        done = runs[name]
        rows.append({"variant": name, "differs": differs, "repeats": len(done),
                     "tokens_per_second": statistics.median(r["tokens_per_second"] for r in done),
                     "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in done),
                     "mean_train_loss": done[0]["mean_train_loss"]})
    first = rows[0]
    for row in rows:
        row["speed_vs_first"] = round(row["tokens_per_second"] / first["tokens_per_second"], 3)
        row["memory_vs_first"] = round(row["peak_rss_gib"] / first["peak_rss_gib"], 3)
    return {"steps": steps, "overrides": base, "variants": rows, "runs": runs}


def bf16_checkpoint(bench: Bench) -> str:
    """The measured model saved in bf16, as most published checkpoints are (rounded once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.models.load import resolve_model

    source, folder = resolve_model(bench.model), bench.scratch / "bf16-checkpoint"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def render_variants(data: dict, stem: str, setting: str) -> str:
    body = [[r["variant"] if r["differs"] == "nothing" else f"{r['variant']}: {r['differs']}",
             f"{r['tokens_per_second']:,.1f}", f"{r['speed_vs_first']:.2f}",
             f"{r['peak_rss_gib']:.2f}", f"{r['memory_vs_first']:.2f}",
             f"{r['mean_train_loss']:.4f}"] for r in data["variants"]]
    first = data["variants"][0]
    return (f"{setting}, {data['steps']} steps, median of {first['repeats']} alternated runs each:\n\n"
            + table(["variant", "tokens/s", f"x {first['variant']}", "peak RSS GiB",
                     f"x {first['variant']}", "mean train loss"], "lrrrrr", body)
            + "\n\n" + source_line(stem) + "\n")


def render(rows: list[dict]) -> str:
    runtime, runs = rows[0], rows[1:]
    steps = runs[0]["steps"]
    body = [[f"{r['lever']}: {r['adds']}", f"{r['tokens_per_second']:.1f}",
             f"{r['speed_vs_previous']:.2f}", f"{r['peak_rss_gib']:.2f}",
             f"{r['memory_vs_previous']:.2f}", f"{r['plan_estimate_gib']:.2f}",
             f"{r['mean_train_loss']:.3f}"] for r in runs]
    return (f"The runtime alone (imports and tokenizer, no weights): "
            f"{runtime['peak_rss_gib']:.2f} GiB peak RSS.\n\n"
            + table(["lever (each row adds one to the row above)", "tokens/s", "x previous",
                     "peak RSS GiB", "x previous", "plan estimate GiB",
                     f"mean train loss over {steps} steps"], "lrrrrrr", body)
            + "\n\n" + source_line("memory_levers") + "\n")


TABLES = ("levers", "always-on", "always-on-autocast", "checkpoint-dtype")


def main() -> None:
    if sys.argv[1:2] == ["--runtime-child"]:
        runtime_child(sys.argv[2])
        return
    bench = Bench("memory_levers", __doc__,
                  settings={"steps": ("optimizer steps per row", 20, 2),
                            "repeats": ("alternated runs of each variant", 3, 1)},
                  configure=lambda parser: parser.add_argument(
                      "--only", default=",".join(TABLES),
                      help=f"the tables to measure, of {', '.join(TABLES)} (the others keep their JSON)"))
    steps, repeats = bench.settings["steps"], bench.settings["repeats"]
    tables = bench.args.only.split(",")
    if not bench.args.render_only:
        if "levers" in tables:
            bench.write_json(measure(bench, steps))
        if "always-on" in tables:
            bench.write_json(measure_variants(bench, steps, repeats, ALWAYS_ON_BASE, ALWAYS_ON),
                             "memory_levers_always_on")
        if "always-on-autocast" in tables:
            bench.write_json(measure_variants(bench, steps, repeats, [], ALWAYS_ON_AUTOCAST),
                             "memory_levers_always_on_autocast")
        if "checkpoint-dtype" in tables:
            base = ["bf16=false", f"model_name_or_path={bf16_checkpoint(bench)}"]
            bench.write_json(measure_variants(bench, steps, repeats, base, CHECKPOINT_DTYPE),
                             "memory_levers_checkpoint_dtype")
    bench.rewrite("BENCHMARKS.md", "memory_levers", render(bench.read_json()))
    bench.rewrite("BENCHMARKS.md", "memory_levers_always_on", render_variants(
        bench.read_json("memory_levers_always_on"), "memory_levers_always_on",
        f"`{' '.join(ALWAYS_ON_BASE)}`"))
    bench.rewrite("BENCHMARKS.md", "memory_levers_always_on_autocast", render_variants(
        bench.read_json("memory_levers_always_on_autocast"), "memory_levers_always_on_autocast",
        "The quickstart as shipped (bf16 autocast)"))
    bench.rewrite("BENCHMARKS.md", "memory_levers_checkpoint_dtype", render_variants(
        bench.read_json("memory_levers_checkpoint_dtype"), "memory_levers_checkpoint_dtype",
        "The quickstart job on the default model saved in bf16, `bf16=false`"))


if __name__ == "__main__":
    main()
