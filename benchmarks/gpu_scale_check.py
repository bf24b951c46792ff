"""The sharded engines on this machine's GPUs: one FSDP2 run of lmtune and one DeepSpeed ZeRO-3
step, on a small Llama model built from a config (random weights, no download).

- FSDP2: `lmtune train --nproc N` with `fsdp: full_shard` (full fine-tuning, bf16 autocast) for
  4 steps with a sharded checkpoint at step 2, then the same run resumed from that checkpoint: the
  resumed weights must equal the uninterrupted run's bit for bit.
- ZeRO-3: lmtune refuses `deepspeed` in this version, so this drives DeepSpeed's own engine
  (deepspeed.initialize with the stage and offload of examples/deepspeed/ds_z3_config.json) for a
  few forward / backward / step rounds on random tokens. Skipped, with the reason printed, without
  the deepspeed package or without CUDA.

N is the number of CUDA GPUs (nccl). With --smoke: a tiny model, 2 processes with gloo on the CPU,
results into a scratch folder; that checks the script, it measures nothing. Every child has a
time limit, so a hang fails the check instead of blocking it; the whole check fits in 8 minutes
on one GPU.

    python benchmarks/gpu_scale_check.py            # writes benchmarks/results/gpu_scale_check.json
    python benchmarks/gpu_scale_check.py --smoke
"""

from __future__ import annotations

import importlib.util
import json
import math
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


def fsdp2_check(bench: Bench, model: str, nproc: int) -> dict:
    from safetensors.torch import load_file

    config = {"model_name_or_path": model, "dataset": "identity", "dataset_dir": str(ROOT / "data"),
              "finetuning_type": "full", "fsdp": "full_shard auto_wrap", "cutoff_len": 256,
              "per_device_train_batch_size": 2, "learning_rate": 1e-5, "max_steps": 4,
              "save_steps": 2, "logging_steps": 1, "plot_loss": False, "seed": 0,
              "bf16": torch.cuda.is_available(), "overwrite_output_dir": True}
    runs = {}
    for name, extra in (("uninterrupted", {}), ("resumed", {"overwrite_output_dir": False})):
        out = bench.scratch / f"fsdp2-{name}"
        shutil.rmtree(out, ignore_errors=True)  # a smoke run's scratch folder is reused
        keys = config | extra | {"output_dir": str(out)}
        if name == "resumed":
            keys["resume_from_checkpoint"] = str(bench.scratch / "fsdp2-uninterrupted" / "checkpoint-2")
        path = bench.scratch / f"fsdp2-{name}.yaml"
        path.write_text(yaml.safe_dump(keys))
        wall = run([sys.executable, "-m", "lmtune.cli", "train", str(path), "--nproc", str(nproc)],
                   bench.scratch / f"fsdp2-{name}.log")
        results = json.loads((out / "all_results.json").read_text())
        runs[name] = {"wall_s": wall, "train_loss": round(results["train_loss"], 6),
                      "train_tokens_per_second": results["train_tokens_per_second"]}
    a = load_file(bench.scratch / "fsdp2-uninterrupted" / "model.safetensors")
    b = load_file(bench.scratch / "fsdp2-resumed" / "model.safetensors")
    shards = sorted(p.name for p in (bench.scratch / "fsdp2-uninterrupted" / "checkpoint-2"
                                     / "fsdp_shards").glob("*.distcp"))
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"ok": exact and len(shards) == nproc, "resume_bit_exact": exact,
            "checkpoint_shard_files": len(shards), **runs}


def zero3_check(bench: Bench, model: str, nproc: int) -> dict:
    missing = [what for what, present in (
        ("the deepspeed package is not installed", importlib.util.find_spec("deepspeed")),
        ("there is no CUDA GPU", torch.cuda.is_available())) if not present]
    if missing:
        reason = " and ".join(missing)
        print(f"ZeRO-3: skipped ({reason})")
        return {"skipped": reason}
    out = bench.scratch / "zero3.json"
    wall = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", __file__, "--zero3-worker", model, str(out)],
               bench.scratch / "zero3.log")
    return json.loads(out.read_text()) | {"wall_s": wall}


def zero3_worker(model_dir: str, out: Path, steps: int = 3) -> None:
    """One rank of the ZeRO-3 check (under torchrun)."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed()
    example = json.loads((ROOT / "examples" / "deepspeed" / "ds_z3_config.json").read_text())
    zero = {k: v for k, v in example["zero_optimization"].items() if v != "auto"}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_allow_untested_optimizer": True, "zero_optimization": zero}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        tokens = torch.randint(model.config.vocab_size, (2, 256), generator=generator).cuda()
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        losses.append(round(loss.item(), 6))
    torch.cuda.synchronize()
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps({
            "ok": all(map(math.isfinite, losses)),
            "zero_stage": zero["stage"], "losses": losses,
            "seconds_per_step": round((time.perf_counter() - start) / steps, 3),
            "peak_gpu_gib_rank0": round(torch.cuda.max_memory_allocated() / 2**30, 3)}))


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
              "fsdp2": fsdp2_check(bench, model, nproc), "zero3": zero3_check(bench, model, nproc)}
    print(json.dumps(result, indent=2))
    bench.write_json(result)
    failed = [name for name in ("fsdp2", "zero3")
              if not result[name].get("ok", "skipped" in result[name])]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--zero3-worker":
        zero3_worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
