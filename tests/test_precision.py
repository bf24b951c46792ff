"""frozen_dtype: auto: an adapter method's frozen base is stored in bf16 under bf16 autocast, with the
same math as the fp32-stored run (forward and the trained parameters' gradients), fp32 adapters on
disk, and every path that runs the model (eval, generation, dpo's reference, ppo's rollouts) working
on it. frozen_dtype: bfloat16 stores it so in fp32 compute too: the very numbers of an fp32 run
on bf16 weights, and within rounding of one on fp32 weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmtune.config import RunConfig
from lmtune.models.load import load_model
from lmtune.models.methods import apply_method
from lmtune.models.precision import checkpoint_half_dtype, half_frozen_base, store_matrices_in
from lmtune.train.forward import token_loss_sum
from tests.conftest import PAIRS, train, write_json


def build(model_dir: str, method: str, frozen_dtype: str, bf16: bool = True) -> torch.nn.Module:
    cfg = RunConfig(model_name_or_path=model_dir, finetuning_type=method, lora_rank=4, bf16=bf16,
                    frozen_dtype=frozen_dtype)
    model = load_model(model_dir, half_precision=half_frozen_base(cfg, checkpoint_half_dtype(model_dir)))
    torch.manual_seed(1)
    model = apply_method(model, cfg)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at init, which would leave lora_A without a gradient
            torch.nn.init.normal_(param, std=0.05)
    return model


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :10] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model: torch.nn.Module, data: dict[str, torch.Tensor], autocast: bool = True
                   ) -> tuple[float, dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = token_loss_sum(model, data) / 60
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "prompt"])
def test_bf16_stored_base_keeps_the_loss_and_gradients(tiny_model_dir, method):
    reference = build(tiny_model_dir, method, "float32")
    half = build(tiny_model_dir, method, "auto")
    frozen = [p for p in half.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in reference.parameters())
    assert {p.dtype for p in frozen if p.ndim >= 2} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad or p.ndim < 2)
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
    reference_bytes = sum(p.numel() * p.element_size() for p in reference.parameters()
                          if not p.requires_grad)
    assert frozen_bytes < 0.51 * reference_bytes

    data = batch()
    loss, grads = loss_and_grads(reference, data)
    half_loss, half_grads = loss_and_grads(half, data)
    assert half_loss == pytest.approx(loss, rel=1e-4)
    assert grads.keys() == half_grads.keys()
    for name, grad in grads.items():
        assert half_grads[name].dtype == torch.float32
        assert (half_grads[name] - grad).norm() <= 0.03 * grad.norm(), name


def assert_fp32_arithmetic_on_the_same_values(reference: torch.nn.Module, half: torch.nn.Module):
    """The fp32 run and the half-stored one give the same loss and gradients: fp32 arithmetic on the
    same values, only the order of the sums inside a matmul may differ."""
    # peft initialises an adapter in its base's dtype before upcasting it: start both from the same
    trained = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in half.named_parameters():
            if param.requires_grad:
                param.copy_(trained[name])
    data = batch()
    loss, grads = loss_and_grads(reference, data, autocast=False)
    half_loss, half_grads = loss_and_grads(half, data, autocast=False)
    assert half_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        assert half_grads[name].dtype == torch.float32
        assert (half_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


@pytest.fixture(scope="module")
def bf16_valued_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with every weight rounded to bf16, saved in fp32: a bf16 checkpoint's values."""
    folder = tmp_path_factory.mktemp("bf16-valued")
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_bf16_stored_base_in_fp32_compute_is_exact_on_bf16_weights(bf16_valued_model_dir, method):
    reference = build(bf16_valued_model_dir, method, "float32", bf16=False)
    half = build(bf16_valued_model_dir, method, "bfloat16", bf16=False)
    assert {p.dtype for p in half.parameters() if not p.requires_grad and p.ndim >= 2} == {torch.bfloat16}
    assert_fp32_arithmetic_on_the_same_values(reference, half)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_bf16_stored_base_in_fp32_compute_rounds_fp32_weights_a_little(tiny_model_dir, method):
    """Rounded weights; prefix tuning's keys and values also reach the model in its base's dtype
    (peft casts them), so they are rounded too."""
    reference = build(tiny_model_dir, method, "float32", bf16=False)
    half = build(tiny_model_dir, method, "bfloat16", bf16=False)
    data = batch()
    loss, grads = loss_and_grads(reference, data, autocast=False)
    half_loss, half_grads = loss_and_grads(half, data, autocast=False)
    assert half_loss == pytest.approx(loss, rel=1e-3)
    for name, grad in grads.items():
        assert (half_grads[name] - grad).norm() <= 0.02 * grad.norm(), name


def test_bf16_stored_base_in_fp32_compute_trains_and_saves_fp32(tmp_path, train_config):
    config = train_config | {"frozen_dtype": "bfloat16", "val_size": 2, "eval_strategy": "steps",
                             "eval_generate_samples": 2, "max_new_tokens": 4, "max_steps": 4}
    results = train(tmp_path, config)
    assert results["eval_loss"] > 0 and "eval_bleu-4" in results
    assert adapter_dtypes(Path(config["output_dir"])) == {"F32"}


@pytest.mark.parametrize("update", [{"finetuning_type": "full"}, {"finetuning_type": "oft"},
                                    {"quantization_bit": 4}, {"deepspeed": "ds.json"}])
def test_frozen_dtype_bfloat16_is_refused_where_it_cannot_apply(update):
    from lmtune.config.io import build_config
    from lmtune.errors import ConfigError

    with pytest.raises(ConfigError, match="frozen_dtype: bfloat16 cannot apply"):
        build_config({"finetuning_type": "lora", "frozen_dtype": "bfloat16"} | update)


@pytest.mark.parametrize("update,expect_half", [
    ({}, True), ({"bf16": False}, False), ({"frozen_dtype": "float32"}, False),
    ({"finetuning_type": "full"}, False), ({"finetuning_type": "freeze"}, False),
    ({"quantization_bit": 4}, False), ({"finetuning_type": "ptuning"}, True),
    ({"bf16": False, "frozen_dtype": "bfloat16"}, True)])
def test_which_runs_store_the_base_in_half_precision(update, expect_half):
    assert half_frozen_base(RunConfig(**{"finetuning_type": "lora", "bf16": True} | update)) is expect_half


@pytest.fixture(scope="module")
def bf16_checkpoint_dir(tiny_model_dir, tokenizer, tmp_path_factory) -> str:
    """The tiny model saved in bf16, as most published checkpoints are."""
    folder = tmp_path_factory.mktemp("bf16-checkpoint")
    load_model(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_checkpoint_dtype_is_read_from_the_weights(bf16_checkpoint_dir, tiny_model_dir, tmp_path):
    assert checkpoint_half_dtype(bf16_checkpoint_dir) == torch.bfloat16
    assert checkpoint_half_dtype(tiny_model_dir) is None  # fp32
    mixed = tmp_path / "mixed"
    model = load_model(bf16_checkpoint_dir, dtype=torch.bfloat16)
    model.model.norm.float()
    model.save_pretrained(mixed)
    assert checkpoint_half_dtype(mixed) is None


@pytest.mark.parametrize("update,expect_half", [
    ({}, True), ({"frozen_dtype": "float32"}, False), ({"finetuning_type": "prompt"}, True),
    ({"finetuning_type": "prefix"}, False), ({"finetuning_type": "full"}, False),
    ({"quantization_bit": 4}, False), ({"deepspeed": "ds.json"}, False), ({"bf16": True}, True)])
def test_fp32_compute_keeps_a_half_precision_checkpoint_so(update, expect_half):
    cfg = RunConfig(**{"finetuning_type": "lora"} | update)
    assert half_frozen_base(cfg, torch.bfloat16) is expect_half
    assert half_frozen_base(cfg, None) is bool(update.get("bf16"))


@pytest.mark.parametrize("method", ["lora", "prompt", "ia3"])
def test_a_bf16_checkpoint_in_fp32_compute_is_stored_as_it_is_with_the_same_numbers(
        bf16_checkpoint_dir, method):
    reference = build(bf16_checkpoint_dir, method, "float32", bf16=False)
    kept = build(bf16_checkpoint_dir, method, "auto", bf16=False)
    assert all(p.dtype == torch.float32 for p in reference.parameters())
    assert {p.dtype for p in kept.parameters() if not p.requires_grad and p.ndim >= 2} == {torch.bfloat16}
    assert_fp32_arithmetic_on_the_same_values(reference, kept)


def test_a_run_and_its_plan_keep_a_bf16_checkpoint_in_bf16(bf16_checkpoint_dir, tmp_path, train_config):
    from lmtune.config.io import build_config
    from lmtune.plan import build_plan
    from lmtune.train.setup import start_run

    keys = train_config | {"model_name_or_path": bf16_checkpoint_dir, "bf16": False}
    inputs = start_run(build_config(keys))
    assert {p.dtype for p in inputs.model.parameters() if p.ndim >= 2} == {torch.bfloat16}
    planned = {dtype: build_plan(build_config(keys | {"frozen_dtype": dtype}))[0]["model"]["memory_gib"]
               for dtype in ("auto", "float32")}
    assert planned["auto"]["weights"] < 0.6 * planned["float32"]["weights"]


def test_a_half_precision_weight_no_layer_casts_is_widened_once(tiny_model_dir):
    from lmtune.models.precision import UpcastLinear, settle_dtypes

    model = load_model(tiny_model_dir, half_precision=True).requires_grad_(False)
    model.model.extra = torch.nn.Conv1d(2, 2, 1).bfloat16().requires_grad_(False)
    settle_dtypes(model, fp32_compute=True)
    assert model.model.extra.weight.dtype == torch.float32
    assert type(model.model.layers[0].mlp.up_proj) is UpcastLinear
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_half_precision_follows_a_float16_checkpoint(tiny_model_dir, tmp_path):
    fp16_dir = tmp_path / "fp16"
    load_model(tiny_model_dir, dtype=torch.float16).save_pretrained(fp16_dir)
    assert load_model(str(fp16_dir), half_precision=True).dtype == torch.float16
    assert load_model(tiny_model_dir, half_precision=True).dtype == torch.bfloat16


def test_an_fp32_checkpoint_is_stored_matrix_by_matrix(tiny_model_dir):
    """Each matrix is the checkpoint's rounded once; 1-D weights keep their fp32 values; the tied
    head stays tied."""
    model = load_model(tiny_model_dir, half_precision=True)
    with safe_open(Path(tiny_model_dir) / "model.safetensors", framework="pt") as stored:
        for name in stored.keys():
            param, value = model.get_parameter(name), stored.get_tensor(name)
            assert value.dtype == torch.float32
            expected = value.bfloat16() if value.ndim >= 2 else value
            assert param.dtype == expected.dtype and torch.equal(param, expected), name
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.dtype == torch.bfloat16


def resident_file_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_converting_hands_back_the_checkpoint_pages_it_read(tiny_model_dir):
    """Loaded as stored, the weights are the mapped file's pages; once a matrix is converted its
    pages leave the process (read, they would stay until the whole file is let go)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="auto")
    embedding = model.get_input_embeddings().weight
    float(embedding.data.sum())  # its pages are resident now
    before = resident_file_bytes()
    store_matrices_in(model, torch.bfloat16)
    assert before - resident_file_bytes() >= 0.8 * embedding.numel() * 4


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_a_quantized_load_hands_back_the_pages_it_quantized_from(tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    """bitsandbytes reads every full-precision linear weight to quantize it; the embeddings, kept
    as stored, keep the file mapped, and the read pages stayed resident with it."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    import lmtune.models.load as load

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.update({"hidden_size": 256, "intermediate_size": 1024, "head_dim": 64})
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    AutoModelForCausalLM.from_config(config).save_pretrained(blobs)
    snapshot.mkdir()  # laid out as the hub cache lays a snapshot out: links to the files
    for file in blobs.iterdir():
        (snapshot / file.name).symlink_to(file)
    with safe_open(blobs / "model.safetensors", framework="pt") as stored:
        linear = sum(stored.get_slice(n).get_shape()[0] * stored.get_slice(n).get_shape()[1] * 4
                     for n in stored.keys() if "layers" in n and n.endswith("proj.weight"))
    released = []
    real = load.release_quantized_sources
    read_and_resident = []

    def measured(model, folder):
        read_and_resident.append(resident_file_bytes())
        released.append(real(model, folder))
        read_and_resident.append(resident_file_bytes())
        return released[-1]

    monkeypatch.setattr(load, "release_quantized_sources", measured)
    model = load_model(str(snapshot), quantization=BitsAndBytesConfig(load_in_4bit=True))
    assert 0.95 * linear <= released[0] <= linear  # all but the pages a weight shares at its ends
    assert read_and_resident[0] - read_and_resident[1] >= 0.9 * released[0]
    # what is kept as stored is still read from the file, as it was
    assert torch.equal(model.get_input_embeddings().weight,
                       safe_open(blobs / "model.safetensors", framework="pt")
                       .get_tensor("model.embed_tokens.weight"))


def test_generating_first_leaves_training_gradients_intact(tiny_model_dir):
    """No eval-mode kernel repacks bf16 weights for inference (as bitsandbytes does with 4-bit
    weights on avx512_bf16 CPUs): after generate() the gradients are a fresh model's."""
    used, fresh = build(tiny_model_dir, "lora", "auto"), build(tiny_model_dir, "lora", "auto")
    used.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = used.generate(input_ids=torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    used.train()
    data = batch()
    loss, grads = loss_and_grads(used, data)
    fresh_loss, fresh_grads = loss_and_grads(fresh, data)
    assert loss == fresh_loss
    for name, grad in grads.items():
        torch.testing.assert_close(grad, fresh_grads[name], rtol=0, atol=0)


def adapter_dtypes(folder: Path) -> set[str]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_sft_run_with_generation_metrics_saves_an_fp32_adapter(tmp_path, train_config):
    config = train_config | {"bf16": True, "val_size": 2, "eval_strategy": "steps",
                             "eval_generate_samples": 2, "max_new_tokens": 4, "max_steps": 4}
    results = train(tmp_path, config)
    assert "eval_bleu-4" in results and results["eval_loss"] > 0
    assert adapter_dtypes(Path(config["output_dir"])) == {"F32"}


@pytest.mark.parametrize("precision", [{"bf16": True}, {"frozen_dtype": "bfloat16"}])
def test_dpo_reference_on_a_bf16_base(tmp_path, tiny_model_dir, precision):
    data = write_json(tmp_path / "data" / "pairs.json", PAIRS)
    write_json(tmp_path / "data" / "dataset_info.json", {"pairs": {"file_name": data.name, "ranking": True}})
    config = {"model_name_or_path": tiny_model_dir, "dataset_dir": str(data.parent), "dataset": "pairs",
              "stage": "dpo", "output_dir": str(tmp_path / "out"),
              "finetuning_type": "lora", "lora_rank": 4, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "max_steps": 6, "logging_steps": 1, "save_steps": 100, "seed": 0}
    results = train(tmp_path, config | precision)
    # The reference is the policy before its first update: the first step's margin is zero.
    first = json.loads((tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()[0])
    assert abs(first["reward_margin"]) < 1e-2
    assert results["train_loss"] < 0.6931
    assert adapter_dtypes(tmp_path / "out") == {"F32"}


@pytest.mark.parametrize("precision", [{"bf16": True}, {"frozen_dtype": "bfloat16"}])
def test_ppo_rollouts_on_a_bf16_base(tmp_path, ppo_config, precision):
    results = train(tmp_path, ppo_config | precision | {"max_steps": 2})
    assert results["global_step"] == 2 and results["allocator"] in ("mimalloc", "system")
    assert adapter_dtypes(Path(ppo_config["output_dir"])) == {"F32"}
