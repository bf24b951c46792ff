"""The sharded engines on this machine's GPUs: lmtune's FSDP2 and DeepSpeed ZeRO-3 runs (ZeRO-3 with
offload too), on a small Llama model built from a config (random weights, no download).

Each engine: `lmtune train --nproc N` (full fine-tuning, bf16 autocast on CUDA) for 4 steps with a
checkpoint of each rank's shards at step 2, then the same run resumed from that checkpoint: the
resumed weights must equal the uninterrupted run's bit for bit, and the checkpoint must hold one
shard file per rank. FSDP2 uses `fsdp: full_shard auto_wrap`; ZeRO-3 LLaMA-Factory's
examples/deepspeed/ds_z3_config.json and ds_z3_offload_config.json (offload only on CUDA: on the
CPU the states are in CPU memory already).

N is the number of CUDA GPUs (nccl). With --smoke: a tiny model, 2 processes with gloo on the CPU,
results into a scratch folder; that checks the script, it measures nothing. Every child has a
time limit, so a hang fails the check instead of blocking it; the whole check fits in 8 minutes
on one GPU.

    python benchmarks/gpu_scale_check.py            # writes benchmarks/results/gpu_scale_check.json
    python benchmarks/gpu_scale_check.py --smoke
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, Bench  # noqa: E402

CHILD_TIMEOUT_S = 150
# A ~110M-parameter Llama (the default tokenizer's 49,152-token vocabulary): big enough that
# sharding moves real tensors, small enough to build and run in seconds.
SMALL = {"num_hidden_layers": 8, "hidden_size": 768, "intermediate_size": 2048,
         "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64}
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def build_model(folder: Path, shape: dict[str, int]) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmtune.models.load import load_tokenizer, resolve_model

    default = resolve_model("default")
    config = AutoConfig.from_pretrained(default)
    config.update(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    load_tokenizer(default).save_pretrained(folder)
    return str(folder)


def run(command: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run a child with the time limit; -> its wall time. A failure or a hang ends the check."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            child = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=os.environ | {"PYTHONPATH": str(ROOT / "src")} | (env or {}),
                                   timeout=CHILD_TIMEOUT_S, start_new_session=True)
        except subprocess.TimeoutExpired:
            sys.exit(f"{' '.join(command)} ran past {CHILD_TIMEOUT_S} s (a hang?); log: {log}")
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"{' '.join(command)} failed (exit {child.returncode}):\n{tail}")
    return round(time.perf_counter() - start, 2)


# engine -> (its YAML keys, the checkpoint's shard files: one per rank)
ENGINES = {
    "fsdp2": ({"fsdp": "full_shard auto_wrap"}, "fsdp_shards/*.distcp"),
    "zero3": ({"deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json")},
              "deepspeed/zero/*optim_states.pt"),
    "zero3_offload": ({"deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z3_offload_config.json")},
                      "deepspeed/zero/*optim_states.pt"),
}


def engine_check(bench: Bench, model: str, nproc: int, engine: str) -> dict:
    """`lmtune train --nproc` under `engine`, uninterrupted and resumed from its step-2 checkpoint."""
    from safetensors.torch import load_file

    keys, shard_files = ENGINES[engine]
    config = {"model_name_or_path": model, "dataset": "identity", "dataset_dir": str(ROOT / "data"),
              "finetuning_type": "full", "cutoff_len": 256,
              "per_device_train_batch_size": 2, "learning_rate": 1e-5, "max_steps": 4,
              "save_steps": 2, "logging_steps": 1, "plot_loss": False, "seed": 0,
              "bf16": torch.cuda.is_available(), "overwrite_output_dir": True} | keys
    runs = {}
    for name, extra in (("uninterrupted", {}), ("resumed", {"overwrite_output_dir": False})):
        out = bench.scratch / f"{engine}-{name}"
        shutil.rmtree(out, ignore_errors=True)  # a smoke run's scratch folder is reused
        run_keys = config | extra | {"output_dir": str(out)}
        if name == "resumed":
            run_keys["resume_from_checkpoint"] = str(bench.scratch / f"{engine}-uninterrupted"
                                                     / "checkpoint-2")
        path = bench.scratch / f"{engine}-{name}.yaml"
        path.write_text(yaml.safe_dump(run_keys))
        wall = run([sys.executable, "-m", "lmtune.cli", "train", str(path), "--nproc", str(nproc)],
                   bench.scratch / f"{engine}-{name}.log")
        results = json.loads((out / "all_results.json").read_text())
        runs[name] = {"wall_s": wall, "train_loss": round(results["train_loss"], 6),
                      "train_tokens_per_second": results["train_tokens_per_second"]}
    a = load_file(bench.scratch / f"{engine}-uninterrupted" / "model.safetensors")
    b = load_file(bench.scratch / f"{engine}-resumed" / "model.safetensors")
    shards = list((bench.scratch / f"{engine}-uninterrupted" / "checkpoint-2").glob(shard_files))
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"ok": exact and len(shards) == nproc, "resume_bit_exact": exact,
            "checkpoint_shard_files": len(shards), **runs}


def main() -> None:
    bench = Bench("gpu_scale_check", __doc__)
    bench.scratch.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    if not gpus and not bench.smoke:
        sys.exit("no CUDA GPU here: run on a GPU machine, or pass --smoke to check the script.")
    nproc = gpus or 2
    model = build_model(bench.scratch / "model", TINY if bench.smoke else SMALL)
    result = {"smoke": bench.smoke, "processes": nproc,
              "device": torch.cuda.get_device_name(0) if gpus else "cpu (gloo)",
              "torch": torch.__version__, "model_shape": TINY if bench.smoke else SMALL,
              # Offloading needs a GPU to offload from.
              **{engine: engine_check(bench, model, nproc, engine) for engine in ENGINES
                 if gpus or engine != "zero3_offload"}}
    print(json.dumps(result, indent=2))
    bench.write_json(result)
    failed = [name for name in ENGINES if name in result and not result[name]["ok"]]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
