"""Memory per GPU for 8B and 70B Llama models, full and LoRA fine-tuning, on 1, 8 and 16 GPUs,
as `lmtune plan --world-size N` computes it: the models are built on the meta device from their
config alone (Llama-3.1 shapes, no weights), the data is the identity dataset, bf16 autocast with
gradient checkpointing, one row per device.

    python benchmarks/scale_memory.py      # prints a table, writes benchmarks/results/scale_memory.json
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

from transformers import LlamaConfig

from lmtune.config import build_config
from lmtune.models.load import load_tokenizer, resolve_model
from lmtune.plan import build_plan
from lmtune.runtime import configure

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}
METHODS = {"full": {"finetuning_type": "full"},
           "lora": {"finetuning_type": "lora", "lora_rank": 8, "lora_target": "all"}}
WORLD_SIZES = (1, 8, 16)
ENGINES = ("ddp", "fsdp2_shard_grad_op_or_zero2", "fsdp2_full_shard_or_zero3", "zero3_offload")


def model_folder(root: Path, name: str) -> str:
    folder = root / name
    LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False, **MODELS[name]).save_pretrained(folder)
    load_tokenizer(resolve_model("default")).save_pretrained(folder)
    return str(folder)


def main() -> None:
    configure()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in MODELS:
            path = model_folder(Path(scratch), name)
            for method, keys in METHODS.items():
                cfg = build_config({"model_name_or_path": path, "dataset": "identity",
                                    "dataset_dir": str(ROOT / "data"), "bf16": True,
                                    "gradient_checkpointing": True,
                                    "per_device_train_batch_size": 1, **keys})
                for world in WORLD_SIZES:
                    with contextlib.redirect_stdout(io.StringIO()):
                        plan, _, _ = build_plan(cfg, world_size=world)
                    model = plan["model"]
                    rows.append({"model": name, "method": method, "gpus": world,
                                 "params": model["total_params"],
                                 "trainable_params": model["trainable_params"],
                                 "micro_batch_tokens": model["micro_batch_tokens"],
                                 "gib_per_gpu": {e: model["memory_per_rank_gib"][e] for e in ENGINES}})
    print(f"{'model':6} {'method':6} {'GPUs':>4} " + " ".join(f"{e:>30}" for e in ENGINES))
    for r in rows:
        print(f"{r['model']:6} {r['method']:6} {r['gpus']:>4} "
              + " ".join(f"{r['gib_per_gpu'][e]:>30.1f}" for e in ENGINES))
    out = ROOT / "benchmarks" / "results" / "scale_memory.json"
    out.write_text(json.dumps({"source": "lmtune plan --world-size N (meta device, no weights)",
                               "settings": {"dataset": "identity", "bf16": True,
                                            "gradient_checkpointing": True,
                                            "per_device_train_batch_size": 1},
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
