"""lmtune against LLaMA-Factory and TRL on the same job: one LLaMA-Factory YAML, side by side.

The identity LoRA job of issue #13: the default model as an HF folder in fp32 (bf16: false), LoRA
rank 8 on every linear layer, batch 4 x accumulation 2, cutoff 512, the identity data, the same
learning rate, schedule, seed and number of optimizer steps. Contenders, one after another, each in
its own process, alternated over the repeats (medians reported):

- LLaMA-Factory 0.9.5, `llamafactory-cli train` on the YAML, in its own pinned virtual environment
  (benchmarks/.venvs/, built on first use: torch 2.13.0 from the local CPU wheel, then
  llamafactory==0.9.5 with its own pins; the CUDA-linked torchvision and torchaudio wheels it pulls
  are removed and torchaudio is replaced by an empty module, as it imports it unconditionally);
- TRL 1.16's SFTTrainer + peft (this venv), completion-only loss on the same rows as
  prompt/completion conversations, LoRA of the same shape;
- `lmtune train` on the very same YAML.

Each keeps its own defaults for what the YAML does not say: both peers turn gradient checkpointing
on, lmtune leaves it off unless asked, so lmtune runs four times: as is, with the one key more,
recomputing every 2nd layer only, and with its frozen base stored in bf16 while it computes in fp32
(the fp32 checkpoint's weights rounded once at load; the LoRA weights and all arithmetic fp32). Tokens are counted the same way for all:
the rows one run trains (steps x 8) times the mean tokens per row of the data under the model's chat
template (prompt and reply; the target tokens are the replies'), over the run's own train_runtime.
Wall time and peak RSS are the whole process's (imports, data, model, training, saving).

    python benchmarks/peers.py            # ~15 min on 2 cores: writes benchmarks/results/peers.json
    python benchmarks/peers.py --smoke    # the tiny model, 2 steps, 1 repeat: checks the script
    python benchmarks/peers.py --scale-only  # the scale curve alone: peers_scale.json
    python benchmarks/peers.py --table-only  # the side-by-side table alone: peers.json
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import venv
from pathlib import Path

import yaml

from _harness import ROOT, Bench, Run, child_main, measure_in_child, run_child, source_line, table

LLAMAFACTORY = "llamafactory==0.9.5"
PEER_VENVS = ROOT / "benchmarks" / ".venvs"
ROWS_PER_STEP = 4 * 2  # per_device_train_batch_size x gradient_accumulation_steps
CONTENDERS = {
    "llamafactory": "LLaMA-Factory 0.9.5 (`llamafactory-cli train`)",
    "trl": "TRL 1.16 SFTTrainer + peft, completion-only loss",
    "lmtune": "lmtune (`lmtune train`)",
    "lmtune+checkpointing": "lmtune, the YAML + `gradient_checkpointing: true`",
    "lmtune+checkpointing-every-2": "lmtune, the YAML + `gradient_checkpointing: true`, "
                              "`checkpoint_every_n_layers: 2`",
    "lmtune+bf16-base": "lmtune, the YAML + `frozen_dtype: bfloat16`",
}
# What each lmtune contender adds to the YAML, and which layers it recomputes.
LMTUNE_KEYS = {"lmtune": ({}, "off"),
               "lmtune+checkpointing": ({"gradient_checkpointing": True}, "every layer"),
               "lmtune+checkpointing-every-2": ({"gradient_checkpointing": True,
                                           "checkpoint_every_n_layers": 2}, "every other layer"),
               "lmtune+bf16-base": ({"frozen_dtype": "bfloat16"}, "off")}
# Run in the peer's venv: write this process's peak RSS (its own, from VmHWM) where the parent
# asks, then start LLaMA-Factory's command line as `llamafactory-cli` would.
PEAK_LAUNCHER = r"""
import atexit, os, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["LMTUNE_PEAK_RSS_FILE"], "w").write(str(int(line.split()[1]) * 1024))
atexit.register(_peak)
sys.argv = ["llamafactory-cli", *sys.argv[1:]]
from llamafactory.cli import main
sys.exit(main())
"""


def llamafactory_python() -> Path:
    """The Python of LLaMA-Factory's own venv, built on first use."""
    folder = PEER_VENVS / "llamafactory-0.9.5"
    python = folder / "bin" / "python"
    if (folder / "ready").is_file():
        return python
    print(f"building {folder} (once; a few minutes)", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    venv.create(folder, with_pip=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, LLAMAFACTORY, "torch==2.13.0"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio"],
                   check=True)
    site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "torchaudio").mkdir(exist_ok=True)
    (site / "torchaudio" / "__init__.py").write_text('"""Stand-in: no audio on this CPU-only run."""\n')
    subprocess.run([str(python), "-c", "import llamafactory.train.tuner"], check=True)
    (folder / "ready").write_text(LLAMAFACTORY + "\n")
    return python


def write_data(folder: Path) -> tuple[Path, list[dict]]:
    """The identity rows with the quickstart's name, as an alpaca file with its dataset_info.json
    (for LLaMA-Factory and lmtune) and as prompt/completion conversations (for TRL)."""
    config = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    names = config["data_vars"]
    records = json.loads((ROOT / "data" / "identity.json").read_text())
    for record in records:
        for key in ("instruction", "input", "output"):
            for var, value in names.items():
                record[key] = record[key].replace("{{" + var + "}}", value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "identity_bench.json").write_text(json.dumps(records, indent=1))
    (folder / "dataset_info.json").write_text(json.dumps(
        {"identity_bench": {"file_name": "identity_bench.json"}}))
    conversations = [{"prompt": [{"role": "user", "content": "\n".join(
        x for x in (r["instruction"], r["input"]) if x)}],
        "completion": [{"role": "assistant", "content": r["output"]}]} for r in records]
    return folder, conversations


def job_yaml(model: str, data: Path, out: Path, steps: int) -> dict:
    """The one YAML both command lines take, in LLaMA-Factory's keys."""
    return {
        "model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_target": "all", "dataset": "identity_bench", "dataset_dir": str(data),
        "template": "smollm2", "cutoff_len": 512, "overwrite_cache": True,
        "output_dir": str(out), "overwrite_output_dir": True, "logging_steps": 1,
        "save_steps": 100000, "plot_loss": False, "report_to": "none",
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
        "learning_rate": 5.0e-4, "num_train_epochs": 3.0, "max_steps": steps,
        "lr_scheduler_type": "cosine", "warmup_steps": 2, "bf16": False, "seed": 42,
    }


def token_counts(model: str, conversations: list[dict]) -> dict:
    """Mean tokens per row under the model's chat template (its default system prompt included,
    as LLaMA-Factory's smollm2 template and the tokenizer's own both render it), and of the reply."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    total = target = 0
    for row in conversations:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                               return_dict=False)
        whole = tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=False)
        total += min(len(whole), 512)
        target += min(len(whole), 512) - len(prompt)
    return {"tokens_per_row": total / len(conversations),
            "target_tokens_per_row": target / len(conversations)}


def trl_child(spec: dict) -> dict:
    """In a child of this venv: TRL's SFTTrainer on the job, as its documentation sets it up."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    job = spec["job"]
    torch.manual_seed(job["seed"])
    model = AutoModelForCausalLM.from_pretrained(job["model_name_or_path"], dtype=torch.float32)
    args = SFTConfig(
        output_dir=job["output_dir"], per_device_train_batch_size=job["per_device_train_batch_size"],
        gradient_accumulation_steps=job["gradient_accumulation_steps"],
        learning_rate=job["learning_rate"], max_steps=job["max_steps"],
        lr_scheduler_type=job["lr_scheduler_type"], warmup_steps=job["warmup_steps"],
        logging_steps=1, save_strategy="no", report_to="none", seed=job["seed"],
        use_cpu=True, bf16=False, max_length=job["cutoff_len"], completion_only_loss=True)
    # LLaMA-Factory's LoRA defaults for the same keys: alpha = 2 x rank, no dropout.
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    rows = json.loads(Path(spec["rows_file"]).read_text())
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         peft_config=lora)
    metrics = trainer.train().metrics
    trainer.save_model()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"losses": losses, "train_runtime": metrics["train_runtime"],
            "gradient_checkpointing": "every layer" if args.gradient_checkpointing else "off"}


def logged_losses(folder: Path) -> list[float]:
    """The per-step losses of trainer_log.jsonl (LLaMA-Factory's and lmtune's share the name)."""
    lines = (folder / "trainer_log.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if row.get("loss") is not None]


def run_one(name: str, bench: Bench, job: dict, rows: list[dict], tag: str) -> dict:
    out = Path(job["output_dir"])
    log = bench.scratch / "logs" / f"{name}-{tag}.log"
    if name == "trl":
        rows_file = out.with_suffix(".rows.json")
        rows_file.write_text(json.dumps(rows))
        run, result = measure_in_child(__file__, {"job": job, "rows_file": str(rows_file)}, log)
        return {"run": run, **result}
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(job))
    if name.startswith("lmtune"):
        keys, checkpointing = LMTUNE_KEYS[name]
        config.write_text(yaml.safe_dump(job | keys))
        run = run_child([sys.executable, "-m", "lmtune.cli", "train", str(config)], log)
    else:
        run = run_child([str(llamafactory_python()), "-c", PEAK_LAUNCHER, "train", str(config)], log,
                        env={"DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1",
                             "TOKENIZERS_PARALLELISM": "false"})
        checkpointing = "every layer"  # LLaMA-Factory's default (disable_gradient_checkpointing: false)
    results = json.loads((out / "all_results.json").read_text())
    return {"run": run, "losses": logged_losses(out), "train_runtime": results["train_runtime"],
            "gradient_checkpointing": checkpointing}


def model_folder(bench: Bench) -> str:
    """The measured model as an HF folder both peers can load (the default model's converted one)."""
    from lmtune.models.load import resolve_model

    return str(resolve_model(bench.model))


def measure(bench: Bench, model: str) -> dict:
    steps, repeats = bench.settings["steps"], bench.settings["repeats"]
    data, conversations = write_data(bench.scratch / "data")
    counts = token_counts(model, conversations)
    llamafactory_python()  # built before any timing
    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for repeat in range(repeats):
        for name in CONTENDERS:
            out = bench.scratch / f"{name}-{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            result = run_one(name, bench, job_yaml(model, data, out, steps), conversations,
                             str(repeat))
            run: Run = result.pop("run")
            runs[name].append({"wall_s": run.wall_s, "peak_rss_gib": run.peak_rss_gib, **result})
            print(f"{name} #{repeat}: {run.wall_s:.1f} s, {run.peak_rss_gib:.2f} GiB, "
                  f"train {result['train_runtime']:.1f} s, losses {result['losses'][:2]}...",
                  flush=True)
    return {"steps": steps, "rows_per_step": ROWS_PER_STEP, **counts,
            "contenders": summarise(runs, counts, steps), "runs": runs}


def summarise(runs: dict[str, list[dict]], counts: dict, steps: int) -> list[dict]:
    """Each contender's medians over its runs, and its ratios to LLaMA-Factory's."""
    rows_trained = steps * ROWS_PER_STEP
    summary = []
    for name, done in runs.items():
        runtime = statistics.median(r["train_runtime"] for r in done)
        losses = done[0]["losses"]
        summary.append({
            "name": name, "label": CONTENDERS[name], "repeats": len(done),
            "train_runtime_s": round(runtime, 2),
            "tokens_per_second": round(rows_trained * counts["tokens_per_row"] / runtime, 1),
            "target_tokens_per_second": round(rows_trained * counts["target_tokens_per_row"] / runtime, 1),
            "wall_s": round(statistics.median(r["wall_s"] for r in done), 2),
            "peak_rss_gib": round(statistics.median(r["peak_rss_gib"] for r in done), 3),
            "loss_step_1": round(losses[0], 4), "loss_step_10": round(losses[min(9, len(losses) - 1)], 4),
            "loss_last": round(losses[-1], 4), "loss_mean": round(statistics.mean(losses), 4),
            "gradient_checkpointing": done[0]["gradient_checkpointing"],
        })
    base = summary[0]
    for item in summary:
        item["x_llamafactory_speed"] = round(item["tokens_per_second"] / base["tokens_per_second"], 2)
        item["x_llamafactory_peak_rss"] = round(item["peak_rss_gib"] / base["peak_rss_gib"], 2)
    return summary


def render(data: dict) -> str:
    rows = [[item["label"], f"{item['tokens_per_second']:,.1f}", f"{item['x_llamafactory_speed']:.2f}",
             f"{item['wall_s']:.1f}", f"{item['peak_rss_gib']:.2f}",
             f"{item['x_llamafactory_peak_rss']:.2f}",
             item["gradient_checkpointing"],
             f"{item['loss_step_1']:.3f} / {item['loss_step_10']:.3f} / {item['loss_last']:.3f}",
             f"{item['loss_mean']:.3f}"]
            for item in data["contenders"]]
    header = ["contender", "tokens/s", "x LLaMA-Factory", "whole process s", "peak RSS GiB",
              "x LLaMA-Factory RSS", "layers recomputed", "loss at step 1 / 10 / last",
              "mean loss over the steps"]
    return (f"{data['steps']} optimizer steps of {data['rows_per_step']} rows, median of "
            f"{data['contenders'][0]['repeats']} alternated runs each:\n\n"
            + table(header, "lrrrrrllr", rows) + "\n\n" + source_line("peers") + "\n")


def scale_job(model: str, data: Path, out: Path, steps: int, cutoff: int) -> dict:
    """Continued pre-training on the Veloria corpus packed into rows of `cutoff` tokens, LoRA r8,
    one row per step: the same keys for both command lines."""
    return {
        "model_name_or_path": model, "stage": "pt", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_target": "all", "dataset": "veloria_corpus", "dataset_dir": str(data),
        "cutoff_len": cutoff, "overwrite_cache": True, "output_dir": str(out),
        "overwrite_output_dir": True, "logging_steps": 1, "save_steps": 100000, "plot_loss": False,
        "report_to": "none", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-4, "max_steps": steps, "lr_scheduler_type": "constant",
        "bf16": False, "seed": 42,
    }


def measure_scale(bench: Bench, model: str) -> dict:
    """Tokens/s and peak RSS of lmtune and LLaMA-Factory (the faster peer) as rows grow."""
    steps = bench.settings["scale_steps"]
    cutoffs = [64, 128] if bench.smoke else [256, 512, 1024, 2048]
    data = bench.scratch / "corpus"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "data" / "veloria_corpus.jsonl", data)
    (data / "dataset_info.json").write_text(json.dumps({"veloria_corpus": {
        "file_name": "veloria_corpus.jsonl", "columns": {"prompt": "text"}}}))
    points = []
    for cutoff in cutoffs:
        for name in ("llamafactory", "lmtune"):
            out = bench.scratch / f"scale-{name}-{cutoff}"
            shutil.rmtree(out, ignore_errors=True)
            result = run_one(name, bench, scale_job(model, data, out, steps, cutoff), [], f"scale-{cutoff}")
            run: Run = result.pop("run")
            points.append({"name": name, "cutoff_len": cutoff, "wall_s": run.wall_s,
                           "peak_rss_gib": run.peak_rss_gib,
                           "train_runtime_s": result["train_runtime"],
                           "tokens_per_second": round(steps * cutoff / result["train_runtime"], 1),
                           "gradient_checkpointing": result["gradient_checkpointing"]})
            print(f"scale {name} cutoff {cutoff}: {points[-1]['tokens_per_second']} tokens/s, "
                  f"{run.peak_rss_gib:.2f} GiB", flush=True)
    for point in points:
        peer = next(p for p in points if p["name"] == "llamafactory" and p["cutoff_len"] == point["cutoff_len"])
        point["x_llamafactory_speed"] = round(point["tokens_per_second"] / peer["tokens_per_second"], 2)
        point["x_llamafactory_peak_rss"] = round(point["peak_rss_gib"] / peer["peak_rss_gib"], 2)
    return {"steps": steps, "points": points}


def plot_scale(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("llamafactory", "lmtune"):
        points = [p for p in data["points"] if p["name"] == name]
        label = CONTENDERS[name].split(" (")[0]
        speed.plot([p["cutoff_len"] for p in points], [p["tokens_per_second"] for p in points], "o-", label=label)
        memory.plot([p["cutoff_len"] for p in points], [p["peak_rss_gib"] for p in points], "o-", label=label)
    for axis, title in ((speed, "tokens/s"), (memory, "peak RSS (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("cutoff_len (tokens per row, packed)")
        axis.set_title(title)
        axis.legend()
    fig.suptitle("stage pt, LoRA r8, one row per step: lmtune and LLaMA-Factory as rows grow")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_scale(data: dict) -> str:
    rows = [[f"{CONTENDERS[p['name']].split(' (')[0]}, cutoff {p['cutoff_len']:,}",
             f"{p['tokens_per_second']:,.1f}", f"{p['x_llamafactory_speed']:.2f}",
             f"{p['peak_rss_gib']:.2f}", f"{p['x_llamafactory_peak_rss']:.2f}"]
            for p in data["points"]]
    header = ["contender, row length", "tokens/s", "x LLaMA-Factory", "peak RSS GiB",
              "x LLaMA-Factory RSS"]
    return (f"{data['steps']} steps of one packed row each; the plot is "
            "`benchmarks/results/peers_scale.png`:\n\n"
            + table(header, "lrrrr", rows) + "\n\n" + source_line("peers_scale") + "\n")


def configure(parser) -> None:
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--scale-only", action="store_true",
                      help="measure the scale curve only; the side-by-side table keeps its JSON")
    only.add_argument("--table-only", action="store_true",
                      help="measure the side-by-side table only; the scale curve keeps its JSON")


def main() -> None:
    child_main(trl_child)
    bench = Bench("peers", __doc__, settings={"steps": ("optimizer steps per run", 12, 2),
                                              "repeats": ("alternated runs per contender", 3, 1),
                                              "scale_steps": ("steps per run of the scale curve", 6, 2)},
                  configure=configure)
    if not bench.args.render_only:
        model = model_folder(bench)
        if not bench.args.scale_only:
            bench.write_json(measure(bench, model))
        if not bench.args.table_only:
            bench.write_json(measure_scale(bench, model), "peers_scale")
    bench.rewrite("BENCHMARKS.md", "peers", render(bench.read_json()))
    scale = bench.read_json("peers_scale")
    plot_scale(scale, bench.results / "peers_scale.png")
    bench.rewrite("BENCHMARKS.md", "peers_scale", render_scale(scale))


if __name__ == "__main__":
    main()
