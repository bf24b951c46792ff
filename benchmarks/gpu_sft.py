"""LoRA SFT of a Llama-3-8B-shaped model on one GPU: `lmtune train` against transformers' Trainer +
peft in the same call (issue #13's GPU check; it fits in 8 minutes on one H100/H200).

- The model: Llama-3-8B's shape (32 layers, hidden 4,096, 32 heads, 8 KV heads, MLP 14,336,
  vocabulary 128,256) built from its config with random bf16 weights and saved once (no download);
  the default model's tokenizer writes the text (its ids are all below 49,152).
- The data: synthetic instruction rows, packed into rows of 4,096 tokens (`packing: true`,
  `cutoff_len: 4096`); the baseline trains on the very rows lmtune packs (read back from the token
  ids and labels lmtune would train on), so both see the same tokens and targets.
- Both: LoRA r8 (alpha 16) on every linear layer, bf16, one row per step, gradient checkpointing
  on, the same steps and learning rate; the first WARMUP_STEPS steps are left out of the timing.
- lmtune as a user runs it: `flash_attn: auto`, which on packed rows on a CUDA GPU is torch's
  flex_attention. The Trainer runs transformers' default attention (sdpa), as its users do.
- Three more lmtune runs, one lever off each: sdpa attention (`flash_attn: sdpa`), the output head
  on every target position at once (`chunked_cross_entropy: false`); and the base quantized to 4
  bits (QLoRA, bitsandbytes).
- Reported: tokens/s, torch.cuda.max_memory_allocated, the mean loss over the steps (each run
  draws its rows in its own order, so only the mean compares), and MFU = achieved FLOP/s over the
  GPU's dense bf16 peak, with FLOPs per token = 6 x N (all parameters: the frozen base's activations
  still need their gradients) + 12 x layers x hidden x sequence (attention scores and their use,
  forward and backward), as PaLM's appendix counts them.

    python benchmarks/gpu_sft.py            # on a GPU machine: writes benchmarks/results/gpu_sft.json
    python benchmarks/gpu_sft.py --smoke    # a tiny model on the CPU, 2 steps: checks the script
    python benchmarks/gpu_sft.py --base F   # config and tokenizer from folder F, not the default model
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from _harness import ROOT, TINY_SHAPE, Bench, gpu_bench, random_model, source_line, table

LLAMA3_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}
TINY = TINY_SHAPE | {"vocab_size": 49152}
# Dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity), by a part of the name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
WARMUP_STEPS = 2
CHILD_TIMEOUT_S = 240


def write_data(folder: Path, rows: int) -> Path:
    """Instruction rows of a few hundred tokens each, varied so none repeats."""
    words = "the river carries salt and stone past seven towns whose bells ring at dusk".split()
    records = []
    for i in range(rows):
        body = " ".join(words[(i + j) % len(words)] for j in range(300 + 37 * (i % 7)))
        records.append({"instruction": f"Summarise note {i}.", "input": body[:400],
                        "output": body})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"notes": {"file_name": "notes.json"}}))
    return folder


def job(model: str, data: Path, out: Path, cutoff: int, steps: int) -> dict:
    return {"model_name_or_path": model, "stage": "sft", "do_train": True,
            "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_target": "all",
            "dataset": "notes", "dataset_dir": str(data), "cutoff_len": cutoff, "packing": True,
            "output_dir": str(out), "overwrite_output_dir": True, "logging_steps": 1,
            "save_steps": 100000, "plot_loss": False, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1, "learning_rate": 1.0e-4, "max_steps": steps,
            "lr_scheduler_type": "constant", "bf16": torch.cuda.is_available(),
            "gradient_checkpointing": True, "seed": 42}


def lmtune_child(config: str, report: str) -> None:
    """In a child: `lmtune train`, then the GPU's allocation peak."""
    from lmtune.cli import main

    code = main(["train", config])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    Path(report).write_text(json.dumps({"code": code, "max_allocated": peak}))
    sys.exit(code)


def packed_rows(config: dict) -> list[dict]:
    """The rows lmtune trains on for `config` (token ids, labels, and the position ids that restart
    at every packed sample), packed as lmtune packs them; only the tokenizer is loaded."""
    from transformers import AutoConfig

    from lmtune.config import build_config
    from lmtune.data.pipeline import prepare_data, training_rows
    from lmtune.models.load import load_tokenizer

    cfg = build_config(config)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    data = prepare_data(cfg, tokenizer, [tokenizer.eos_token_id], None)
    train, _ = training_rows(data, cfg, AutoConfig.from_pretrained(cfg.model_name_or_path))
    return [{key: [int(x) for x in getattr(row, key)] for key in ("input_ids", "labels", "position_ids")}
            for row in train]


def trainer_child(spec_path: str) -> None:
    """In a child: transformers' Trainer + peft on the same rows, one per step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    spec = json.loads(Path(spec_path).read_text())
    config = spec["job"]
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        config["model_name_or_path"], dtype=torch.bfloat16 if cuda else torch.float32,
        device_map="cuda" if cuda else None)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.enable_input_require_grads()
    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=config["output_dir"], per_device_train_batch_size=1,
        gradient_accumulation_steps=1, learning_rate=config["learning_rate"],
        max_steps=config["max_steps"], lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to="none", bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=True, remove_unused_columns=False, seed=config["seed"])
    trainer = Trainer(model=model, args=args, train_dataset=spec["rows"], callbacks=[StepTimes()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    Path(spec["report"]).write_text(json.dumps({
        "step_ends": stamps, "losses": losses,
        "max_allocated": torch.cuda.max_memory_allocated() if cuda else 0}))


def run(command: list[str], log: Path) -> None:
    with open(log, "w") as out:
        try:
            child = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            sys.exit(f"{command[2]} ran past {CHILD_TIMEOUT_S} s; log: {log}")
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"{' '.join(command[:3])} failed (exit {child.returncode}):\n{tail}")


def trainer_tokens_per_second(step_ends: list[float], tokens: list[int]) -> float:
    """Tokens per second over the steps after the warmup ones (step_ends[i] ends step i + 1)."""
    timed = range(WARMUP_STEPS, len(step_ends))
    return sum(tokens[i] for i in timed) / (step_ends[-1] - step_ends[WARMUP_STEPS - 1])


def lmtune_log(out: Path) -> tuple[float, list[float]]:
    """Tokens per second from lmtune's per-step log (logging_steps: 1), each step's tokens over its
    time after the warmup steps, and the steps' losses."""
    steps = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_second"] for r in steps if "tokens_per_second" in r][WARMUP_STEPS:]
    speed = len(timed) / sum(1 / speed for speed in timed) if timed else float("nan")
    return speed, [r["loss"] for r in steps if "loss" in r]


def flops_per_token(shape: dict, parameters: int, sequence: int) -> float:
    return 6 * parameters + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * sequence


def measure(bench: Bench) -> dict:
    cuda = torch.cuda.is_available()
    shape = TINY if bench.smoke else LLAMA3_8B
    cutoff, steps = (256, 4) if bench.smoke else (4096, 8)
    model = random_model(bench.scratch / "model", shape | {"tie_word_embeddings": False},
                         bench.args.base, torch.bfloat16 if cuda else torch.float32)
    data = write_data(bench.scratch / "data", rows=12 * steps)
    config = job(model, data, bench.scratch / "lmtune", cutoff, steps)
    rows = packed_rows(config)[:steps]
    if len(rows) < steps:
        sys.exit(f"only {len(rows)} packed rows for {steps} steps: write more data.")
    measured = {}
    spec = bench.scratch / "trainer-spec.json"
    spec.write_text(json.dumps({"job": config | {"output_dir": str(bench.scratch / "trainer")},
                                "rows": rows, "report": str(bench.scratch / "trainer-report.json")}))
    run([sys.executable, __file__, "--trainer-child", str(spec)], bench.scratch / "trainer.log")
    theirs = json.loads((bench.scratch / "trainer-report.json").read_text())
    measured["transformers Trainer + peft"] = (trainer_tokens_per_second(
        theirs["step_ends"], [len(r["input_ids"]) for r in rows]), theirs["losses"],
        theirs["max_allocated"])
    print(f"Trainer: {measured['transformers Trainer + peft'][0]:,.0f} tokens/s", flush=True)
    for name, extra in (("lmtune", {}),
                        ("lmtune, sdpa attention", {"flash_attn": "sdpa"}),
                        ("lmtune, whole logits", {"chunked_cross_entropy": False}),
                        ("lmtune, QLoRA 4-bit", {"quantization_bit": 4})):
        out = bench.scratch / name.replace(",", "").replace(" ", "-")
        config_path = out.with_suffix(".yaml")
        config_path.write_text(yaml.safe_dump(config | extra | {"output_dir": str(out)}))
        report = out.with_suffix(".report.json")
        run([sys.executable, __file__, "--lmtune-child", str(config_path), str(report)],
            out.with_suffix(".log"))
        speed, losses = lmtune_log(out)
        measured[name] = (speed, losses, json.loads(report.read_text())["max_allocated"])
        print(f"{name}: {speed:,.0f} tokens/s, max allocated "
              f"{measured[name][2] / 2**30:.2f} GiB", flush=True)
    parameters = _llama_parameters(shape)
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device), None)
    per_token = flops_per_token(shape, parameters, cutoff)
    result = {"device": device, "torch": torch.__version__, "bf16_peak_tflops": peak, "parameters": parameters,
              "sequence": cutoff, "steps": steps, "warmup_steps": WARMUP_STEPS,
              "flops_per_token": per_token, "contenders": []}
    for name, (speed, losses, allocated) in measured.items():
        result["contenders"].append({
            "name": name, "tokens_per_second": round(speed, 1),
            "max_allocated_gib": round(allocated / 2**30, 2),
            "mean_loss": round(sum(losses) / len(losses), 4),
            "mfu": round(speed * per_token / (peak * 1e12), 3) if peak else None})
    base = result["contenders"][0]
    for contender in result["contenders"]:
        contender["x_baseline_speed"] = round(contender["tokens_per_second"]
                                              / base["tokens_per_second"], 2)
        if base["max_allocated_gib"]:
            contender["x_baseline_memory"] = round(contender["max_allocated_gib"]
                                                   / base["max_allocated_gib"], 2)
    return result


def _llama_parameters(shape: dict) -> int:
    h, i, v, L = (shape[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                     "num_hidden_layers"))
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; norms
    return L * per_layer + 2 * v * h + h  # embeddings, head, final norm


def render(data: dict) -> str:
    rows = [[c["name"], f"{c['tokens_per_second']:,.1f}", f"{c['x_baseline_speed']:.2f}",
             f"{c['max_allocated_gib']:.2f}", f"{c.get('x_baseline_memory', float('nan')):.2f}",
             f"{c['mfu']:.1%}" if c["mfu"] is not None else "n/a",
             f"{c['mean_loss']:.3f}"] for c in data["contenders"]]
    return (f"{data['device']}, sequence {data['sequence']:,} packed, {data['steps']} steps "
            f"({data['warmup_steps']} untimed):\n\n"
            + table(["contender", "tokens/s", "x Trainer", "max allocated GiB", "x Trainer",
                     "MFU", "mean loss"], "lrrrrrr", rows)
            + "\n\n" + source_line("gpu_sft") + "\n")


def main() -> None:
    bench = gpu_bench("gpu_sft", __doc__)
    if not bench.args.render_only:
        bench.write_json(measure(bench))
    bench.rewrite("BENCHMARKS.md", "gpu_sft", render(bench.read_json()))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.argv[1:2] == ["--lmtune-child"]:
        lmtune_child(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--trainer-child"]:
        trainer_child(sys.argv[2])
    else:
        main()
