"""`lmtune plan`: the counts, schedule and model side a run would have, before training."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.models.load import FORCE_GROUPED_KV
from lmtune.models.methods import apply_method, count_parameters
from lmtune.plan import kept_per_token_and_layer, memory_estimate, meta_model
from lmtune.train.head_loss import chunk_rows
from tests.conftest import ALPACA, method_model, write_json, write_yaml


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("lmtune.data.cache.cache_dir", lambda: tmp_path / "cache")


def plan_json(tmp_path: Path, config: dict, *flags: str, capsys) -> dict:
    path = write_yaml(tmp_path / "plan.yaml", config)
    assert main(["plan", str(path), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_matches_what_training_then_does(tmp_path, train_config, capsys):
    config = train_config | {"max_steps": -1, "num_train_epochs": 2.0, "per_device_train_batch_size": 3,
                             "gradient_accumulation_steps": 2, "warmup_ratio": 0.25, "val_size": 2}
    plan = plan_json(tmp_path, config, capsys=capsys)
    s = plan["schedule"]
    # 6 training rows, 3 per micro-batch, 2 micro-batches per step: 1 step per epoch.
    assert (s["train_rows"], s["effective_batch"], s["steps_per_epoch"], s["optimizer_steps"],
            s["warmup_steps"]) == (6, 6, 1, 2, 0)
    assert plan["data"]["val"]["rows"] == 2
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    results = json.loads((Path(config["output_dir"]) / "all_results.json").read_text())
    assert results["global_step"] == s["optimizer_steps"]
    assert results["train_rows"] == s["train_rows"]
    assert (results["trainable_params"], results["total_params"]) == (
        plan["model"]["trainable_params"], plan["model"]["total_params"])
    report = json.loads((Path(config["output_dir"]) / "data_report.json").read_text())
    assert [d.pop("cache") for d in report["datasets"]] == ["hit"]  # plan encoded, train reused it
    assert [d.pop("cache") for d in plan["data"]["datasets"]] == ["built"]
    assert report == plan["data"]
    printed = capsys.readouterr().out
    assert "dataset " in printed and "train: 6 rows" in printed  # the same summary, at train start


def test_model_side_counts_without_weights(tiny_model_dir):
    cfg = build_config({"model_name_or_path": tiny_model_dir, "lora_rank": 4})
    meta = meta_model(tiny_model_dir, cfg)
    assert all(p.device.type == "meta" for p in meta.parameters())
    real = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    assert count_parameters(apply_method(meta, cfg)) == count_parameters(real)
    assert meta.generation_config.eos_token_id == real.generation_config.eos_token_id


def test_memory_estimate_parts(tiny_model_dir):
    cfg = build_config({"finetuning_type": "full"})
    model = apply_method(meta_model(tiny_model_dir, cfg), cfg)
    n = sum(p.numel() for p in model.parameters())
    gib = 2**30
    m = memory_estimate(model, cfg, micro_batch_tokens=1024, micro_batch_targets=256)
    assert m["weights"] == round(4 * n / gib, 3)  # fp32 weights
    assert m["gradients"] == m["weights"]  # everything trains
    assert m["optimizer"] == round(8 * n / gib, 3)  # two AdamW moments
    assert m["total"] == pytest.approx(sum(m[k] for k in ("runtime", "weights", "gradients", "optimizer",
                                                          "autocast_copies", "activations")), abs=0.004)
    whole = build_config({"finetuning_type": "full", "chunked_cross_entropy": False})
    one, two = memory_estimate(model, whole, 1024, 256), memory_estimate(model, whole, 2048, 512)
    assert two["activations"] == pytest.approx(2 * one["activations"], rel=0.01)
    # chunked: one chunk's logits however many targets, and each target's hidden-state gradient
    config = model.config
    chunk = chunk_rows(config.vocab_size, "cpu")
    grown = memory_estimate(model, cfg, 1024, 4 * chunk)["activations"] - \
        memory_estimate(model, cfg, 1024, 2 * chunk)["activations"]
    assert grown == pytest.approx(2 * chunk * config.hidden_size * 4 / gib, abs=0.002)
    assert memory_estimate(model, cfg, 1024, 4 * chunk)["activations"] < \
        memory_estimate(model, whole, 1024, 4 * chunk)["activations"]
    lean = memory_estimate(model, build_config({"finetuning_type": "full", "gradient_checkpointing": True,
                                                "bf16": True}), 1024, 256)
    assert lean["activations"] < m["activations"]
    # every 2nd of the tiny model's 2 layers recomputed: one keeps its input, the other its activations
    tokens = 200_000

    def activations(keys: dict, n_tokens: int) -> float:
        cfg = build_config({"finetuning_type": "full", "bf16": True} | keys)
        return memory_estimate(model, cfg, n_tokens, 256)["activations"]

    one_layer = (activations({}, tokens) - activations({}, 0)) / 2
    every = activations({"gradient_checkpointing": True}, tokens)
    every_2nd = activations({"gradient_checkpointing": True, "checkpoint_every_n_layers": 2}, tokens)
    layer_input = 4 * model.config.hidden_size * tokens / gib
    assert every < every_2nd
    assert every_2nd - every == pytest.approx(one_layer - layer_input, abs=0.003)
    lora = build_config({"lora_rank": 4})
    adapter = memory_estimate(apply_method(meta_model(tiny_model_dir, lora), lora), lora, 1024, 256)
    assert adapter["optimizer"] < m["optimizer"] / 10


@pytest.mark.parametrize("precision,width", [({}, 4), ({"bf16": True}, 2)])
def test_no_norm_output_or_mlp_product_is_kept_but_under_fsdp(tiny_model_dir, precision, width):
    # models/recompute.py: in one process or DDP the two norms' outputs and the silu MLP's product
    # are made again in backward; FSDP2 keeps them
    gib, tokens = 2**30, 200_000

    def per_token_layer(keys: dict) -> float:
        cfg = build_config({"finetuning_type": "full"} | precision | keys)
        model = apply_method(meta_model(tiny_model_dir, cfg), cfg)
        grown = memory_estimate(model, cfg, tokens, 0)["activations"] - \
            memory_estimate(model, cfg, 0, 0)["activations"]
        return grown * gib / tokens / model.config.num_hidden_layers

    config = AutoConfig.from_pretrained(tiny_model_dir)
    kept = per_token_layer({"fsdp": "full_shard"}) - per_token_layer({})
    assert kept == pytest.approx(width * (2 * config.hidden_size + config.intermediate_size), rel=0.02)


def decoder_kept_bytes(model: torch.nn.Module, batch: dict, autocast: bool) -> int:
    """What autograd keeps for backward (weights aside) in a forward of the decoder layers, set up
    as a training run sets them up."""
    from lmtune.models import recompute
    from lmtune.models.gated_mlp import keep_less_in_gated_mlps
    from lmtune.models.lora_inputs import pass_half_inputs_as_they_are
    from lmtune.models.shared_mask import share_attention_masks

    keep_less_in_gated_mlps(model)
    pass_half_inputs_as_they_are(model)
    share_attention_masks(model)
    recompute.tag_norm_outputs(model)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor):
        packed = recompute._pack(t)
        if isinstance(packed, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return packed

    decoder = getattr(model, "get_base_model", lambda: model)().model
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with precision, recompute.recomputing_cheap_outputs(), \
            torch.autograd.graph.saved_tensors_hooks(pack, recompute._unpack):
        decoder(**batch).last_hidden_state.float().sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("method,keys", [("lora", {}), ("lora", {"bf16": True}), ("full", {}),
                                         ("full", {"bf16": True})])
def test_kept_bytes_per_token_and_layer_are_what_a_real_forward_keeps(tiny_model_dir, method, keys,
                                                                      monkeypatch):
    monkeypatch.setenv(FORCE_GROUPED_KV, "1")  # as every CPU run sets it
    cfg = build_config({"finetuning_type": method} | ({"lora_rank": 4, "lora_target": "all"}
                                                      if method == "lora" else {}) | keys)

    def kept(rows: int) -> int:
        ids = torch.randint(0, 49152, (rows, 21), generator=torch.Generator().manual_seed(8))
        mask = torch.ones_like(ids)
        mask[1::2, 15:] = 0  # padded rows: the attention mask is kept too
        return decoder_kept_bytes(method_model(tiny_model_dir, method),
                                  {"input_ids": ids, "attention_mask": mask}, bool(keys))

    # Three rows more: what grows with the tokens (autocast's weight copies, counted apart, do not)
    grown, tokens, width = kept(6) - kept(3), 3 * 21, 2 if keys else 4
    model = method_model(tiny_model_dir, method)
    c = model.config
    # Besides the layers: the mask; with LoRA the last norm keeps its input and root mean square,
    # and the first layer's input norm, with nothing trained below it, keeps none; under full
    # fine-tuning both do, and the normalised input for their weights' gradients.
    # Under autocast the first layer's q, k and v LoRA layers also keep autocast's copies of a norm
    # output with no autograd history, which models/recompute.py cannot trace to its recipe (the
    # plan leaves these out: under 1% of the default model's activations).
    norms = (2 * c.hidden_size * 4 + 4) * tokens if method == "full" else 0
    first_layer_copies = 3 * c.hidden_size * width * tokens if method == "lora" and keys else 0
    expected = (c.num_hidden_layers * kept_per_token_and_layer(model, cfg) * tokens
                + tokens * 21 * width + norms + first_layer_copies)
    assert grown == pytest.approx(expected, rel=0.01)


def test_activations_are_kept_from_the_lowest_trained_layer_up(tiny_model_dir):
    # The tiny model has 2 layers: freezing all but the last keeps half of full's layer
    # activations; training the embeddings (or virtual tokens) keeps all of them.
    def activations(keys):
        cfg = build_config(keys)
        return memory_estimate(apply_method(meta_model(tiny_model_dir, cfg), cfg), cfg, 200_000, 0)["activations"]

    full = activations({"finetuning_type": "full"})
    last = activations({"finetuning_type": "freeze", "freeze_trainable_layers": 1})
    first = activations({"finetuning_type": "freeze", "freeze_trainable_layers": -1})
    assert last == pytest.approx(full / 2, rel=0.02) and first == pytest.approx(full, rel=0.02)
    assert activations({"finetuning_type": "freeze", "freeze_trainable_layers": 1,
                        "freeze_extra_modules": "embed_tokens"}) == pytest.approx(full, rel=0.02)
    # virtual tokens: every layer too, without the normalised inputs that trained norms keep
    config = AutoConfig.from_pretrained(tiny_model_dir)
    norms = config.num_hidden_layers * 2 * config.hidden_size * 4 * 200_000 / 2**30
    assert activations({"finetuning_type": "prompt", "num_virtual_tokens": 4}) == \
        pytest.approx(full - norms, rel=0.02)


def test_memory_estimate_counts_runtime_storage_and_autocast_copies(tiny_model_dir):
    from lmtune.plan import RUNTIME_GIB

    gib = 2**30

    def estimate(**keys):
        cfg = build_config({"lora_rank": 4, "bf16": True} | keys)
        model = apply_method(meta_model(tiny_model_dir, cfg), cfg)
        return model, memory_estimate(model, cfg, 1024, 256)

    model, half = estimate()
    _, fp32 = estimate(frozen_dtype="float32")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    big = sum(p.numel() for p in frozen if p.ndim >= 2)
    small = sum(p.numel() for p in frozen if p.ndim < 2)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert half["runtime"] == fp32["runtime"] == RUNTIME_GIB
    assert half["weights"] == round((2 * big + 4 * (small + trained)) / gib, 3)
    assert fp32["weights"] == round(4 * (big + small + trained) / gib, 3)
    # fp32 storage: a bf16 copy of every linear weight (the tied head once, LoRA's A and B too)
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert fp32["autocast_copies"] == round(2 * sum(linear.values()) / gib, 3)
    # half storage: only the fp32 adapters are cast
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert half["autocast_copies"] == round(2 * adapters / gib, 3)
    parts = ("runtime", "weights", "gradients", "optimizer", "autocast_copies", "activations")
    for m in (half, fp32):
        assert m["total"] == pytest.approx(sum(m[k] for k in parts), abs=0.004)
    assert fp32["total"] - half["total"] == pytest.approx(
        (2 * big + 2 * sum(linear.values()) - 2 * adapters) / gib, abs=0.004)
    _, no_autocast = estimate(bf16=False)
    assert no_autocast["autocast_copies"] == 0 and no_autocast["weights"] == fp32["weights"]


@pytest.mark.parametrize("double", [False, True])
def test_a_qlora_plan_reads_no_weight_and_counts_them_at_4_bits(tmp_path, train_config, capsys,
                                                                double):
    # a folder with the config and tokenizer only, of a model large enough for the 4-bit scales
    # to show in MiB: a plan that loaded weights (to quantize them) would fail on it
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for file in Path(train_config["model_name_or_path"]).iterdir():
        if not file.name.endswith(".safetensors"):
            (folder / file.name).write_bytes(file.read_bytes())
    config = AutoConfig.from_pretrained(folder)
    config.update({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4,
                   "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64})
    config.save_pretrained(folder)
    plan = plan_json(tmp_path, train_config | {"model_name_or_path": str(folder), "quantization_bit": 4,
                                               "lora_target": "all", "double_quantization": double},
                     capsys=capsys)
    h, i, kv = 1024, 4096, 4 * 64
    linear = 4 * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    with torch.device("meta"):
        everything = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    everything += plan["model"]["trainable_params"]
    per_weight = 0.5 + (1 if double else 4) / 64  # 4 bits and a scale per block of 64
    expected = linear * per_weight + 4 * (everything - linear)
    assert plan["model"]["memory_gib"]["weights"] == pytest.approx(expected / 2**30, abs=0.001)


def test_plan_warnings_in_plain_words(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    write_json(data / "big.json", [{"instruction": f"question {i}", "output": "answer " * (1 + i % 40)}
                                   for i in range(50)])
    write_json(data / "small.json", ALPACA)
    config = {"model_name_or_path": tiny_model_dir, "dataset": "big.json,small.json",
              "dataset_dir": str(data), "max_samples": 20, "cutoff_len": 40, "val_size": 3}
    path = write_yaml(tmp_path / "plan.yaml", config)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("warning: max_samples=20 keeps the first 20 of 50 rows of big.json (40.0%); 28 of 58 in "
            "all (48.3%)") in out
    assert "warning: cutoff_len=40 truncates " in out and " rows of big.json (" in out
    assert "warning: the val split has only 3 rows" in out
    assert "records: 50 found, " in out and "(dropped: 30 max_samples" in out


def test_examples_and_dump(tmp_path, train_config, tokenizer, capsys):
    dump = tmp_path / "encoded.jsonl"
    path = write_yaml(tmp_path / "plan.yaml", train_config | {"val_size": 2})
    assert main(["plan", str(path), "--examples", "2", "--dump-encoded", str(dump)]) == 0
    out = capsys.readouterr().out
    assert out.count("== example ") == 2
    answers = {r["output"] for r in ALPACA}
    shown = [line for line in out.splitlines() if line.startswith("«")]
    assert shown and all(line.endswith("<|im_end|>»") for line in shown)
    assert all(line[1:-len("<|im_end|>»")] in answers for line in shown)
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["split"] for r in rows].count("val") == 2 and len(rows) == len(ALPACA)
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"])
        trained = tokenizer.decode([t for t, label in zip(r["input_ids"], r["labels"]) if label != -100])
        replies = trained.split("<|im_end|>")
        assert replies[-1] == "" and replies[-2] in answers  # the history reply "Red." trains too
        assert set(replies[:-2]) <= {"Red."}
    assert f"wrote {len(ALPACA)} encoded rows to {dump}" in out


def test_measure_runs_real_steps_in_a_scratch_folder(tmp_path, train_config, capsys):
    plan = plan_json(tmp_path, train_config, "--measure", "--measure-steps", "2", capsys=capsys)
    m = plan["measured"]
    assert m["steps"] == 2 and m["tokens_per_second"] > 0
    s = plan["schedule"]
    run_tokens = plan["data"]["train"]["tokens"] * s["optimizer_steps"] / s["steps_per_epoch"]
    assert m["estimated_train_seconds"] == pytest.approx(run_tokens / m["tokens_per_second"], rel=1e-2)
    assert m["peak_memory_gib"] > 0
    assert not Path(train_config["output_dir"]).exists()  # nothing written where training would go


def test_plan_packing_and_errors(tmp_path, train_config, capsys):
    plan = plan_json(tmp_path, train_config | {"packing": True, "cutoff_len": 96}, capsys=capsys)
    p = plan["data"]["packing"]
    assert p["samples"] == 8 and p["rows"] < 8 and p["samples_per_row"] == pytest.approx(8 / p["rows"])
    assert plan["schedule"]["train_rows"] == p["rows"]
    assert plan["schedule"]["samples_per_step"] == pytest.approx(2 * 8 / p["rows"], abs=0.05)
    path = write_yaml(tmp_path / "none.yaml", {k: v for k, v in train_config.items() if k != "dataset"})
    assert main(["plan", str(path)]) == 2
    assert "lmtune plan needs a dataset" in capsys.readouterr().err


def synthetic(path: Path, n: int, tag: str) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"{tag} task {i}: write a function that adds {i}.",
                                "output": f"def add(x):\n    return x + {i}"}) + "\n")
    return path


def test_acceptance_plan_on_80k_and_260k_records(tmp_path):
    """The issue's acceptance check: max_samples 1000 on 80,000 and 260,000 records, < 60 s."""
    data = tmp_path / "data"
    data.mkdir()
    synthetic(data / "magicoder.jsonl", 80_000, "m")
    synthetic(data / "codefeedback.jsonl", 260_000, "c")
    write_json(data / "dataset_info.json", {"magicoder": {"file_name": "magicoder.jsonl"},
                                            "codefeedback": {"file_name": "codefeedback.jsonl"}})
    config = write_yaml(tmp_path / "plan.yaml", {
        "model_name_or_path": "default", "dataset": "magicoder,codefeedback", "dataset_dir": str(data),
        "max_samples": 1000, "cutoff_len": 1024, "overwrite_cache": True})  # time a real encoding
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lmtune.cli", "plan", str(config), "--json"],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert elapsed < 60
    assert [(d["name"], d["found"], d["kept"]) for d in plan["data"]["datasets"]] == [
        ("magicoder", 80_000, 1000), ("codefeedback", 260_000, 1000)]
    assert ("max_samples=1000 keeps the first 1,000 of 80,000 rows of magicoder (1.2%), 1,000 of "
            "260,000 rows of codefeedback (0.4%); 2,000 of 340,000 in all (0.6%)") in plan["warnings"]
    assert plan["schedule"]["train_rows"] == 2000



def test_plan_counts_ppo_iterations_and_measures_them(tmp_path, tiny_model_dir, capsys):
    data = write_json(tmp_path / "prompts.json", ALPACA * 3)  # 24 prompts
    config = {"model_name_or_path": tiny_model_dir, "stage": "ppo", "dataset": str(data),
              "reward_model": "tests.ppo_rewards:letter_share", "output_dir": str(tmp_path / "out"),
              "lora_rank": 4, "per_device_train_batch_size": 4, "ppo_buffer_size": 2,
              "ppo_epochs": 3, "num_train_epochs": 2.0, "max_new_tokens": 4, "logging_steps": 1}
    plan = plan_json(tmp_path, config, "--measure", "--measure-steps", "2", capsys=capsys)
    s = plan["schedule"]
    # 8 prompts per iteration -> 3 iterations per epoch, 6 in all; each trains its 2 batches 3 times.
    assert (s["effective_batch"], s["steps_per_epoch"], s["iterations"], s["optimizer_steps"]) == (
        8, 3, 6, 36)
    assert plan["measured"]["seconds_per_iteration"] > 0
    assert plan["measured"]["estimated_train_seconds"] == pytest.approx(
        6 * plan["measured"]["seconds_per_iteration"])
    assert main(["train", str(write_yaml(tmp_path / "run.yaml", config))]) == 0
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["global_step"] == s["iterations"]


def test_plan_counts_both_rows_of_a_preference_pair(tmp_path, tiny_model_dir, capsys):
    write_json(tmp_path / "pairs.json", [{"instruction": "Hi?", "chosen": "Hello.",
                                      "rejected": "Go away, please."}] * 4)
    write_json(tmp_path / "dataset_info.json", {"pairs": {"file_name": "pairs.json", "ranking": True}})
    base = {"model_name_or_path": tiny_model_dir, "dataset": "pairs", "dataset_dir": str(tmp_path),
            "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2}
    dpo = plan_json(tmp_path, base | {"stage": "dpo"}, capsys=capsys)
    length = dpo["data"]["train"]["max"]
    assert dpo["model"]["micro_batch_tokens"] == 2 * 2 * length  # 2 pairs x (chosen + rejected)
