"""Packing: samples share rows but never attend to each other; the loss equals the unpacked loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmtune.cli import main
from lmtune.data import batching
from lmtune.data.batching import (check_packing_isolation, collate, model_inputs, pack_documents,
                                  pack_rows)
from lmtune.data.encode import IGNORE_INDEX, ChatEncoder, EncodedRow, TextEncoder
from lmtune.data.formats import Conversation, Document
from lmtune.errors import ConfigError
from lmtune.train.logs import read_log
from lmtune.train.forward import count_targets, token_loss_sum
from tests.conftest import ALPACA, write_yaml

EOS = 2


def conversations() -> list[Conversation]:
    return [Conversation([{"role": "user", "content": r["instruction"] + " " + r["input"]},
                          {"role": "assistant", "content": r["output"]}]) for r in ALPACA]


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[EncodedRow]:
    return [row for row, _ in ChatEncoder(tokenizer, [EOS], 4096).encode_conversations(conversations())]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=request.param).eval()


def test_pack_rows_places_every_sample_once_within_capacity(rows):
    capacity = 96
    packed = pack_rows(rows, capacity)
    assert len(packed) < len(rows)
    assert all(len(r.input_ids) <= capacity for r in packed)
    assert sum(len(r.input_ids) for r in packed) == sum(len(r.input_ids) for r in rows)
    assert sum(r.n_targets for r in packed) == sum(r.n_targets for r in rows)
    pieces = []
    for row in packed:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert starts[0] == 0 and all(row.labels[i] == IGNORE_INDEX for i in starts)
        for a, b in zip(starts, starts[1:] + [len(row.input_ids)]):
            assert row.position_ids[a:b] == list(range(b - a))
            pieces.append(tuple(row.input_ids[a:b]))
    assert sorted(pieces) == sorted(tuple(r.input_ids) for r in rows)


def test_collate_gives_padding_its_own_positions(rows):
    packed = pack_rows(rows, 96)
    batch = collate(packed[:2], pad_id=EOS)
    short, n = min(packed[:2], key=lambda r: len(r.input_ids)), batch["input_ids"].shape[1]
    i = packed[:2].index(short)
    pad = n - len(short.input_ids)
    assert batch["position_ids"][i].tolist() == short.position_ids + list(range(pad))
    assert batch["attention_mask"][i].sum() == len(short.input_ids)  # token counts stay right
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert set(model_inputs(collate(rows[:2], EOS))) == {"input_ids", "attention_mask", "use_cache"}


def loss_and_grads(model, batches) -> tuple[float, int, torch.Tensor]:
    model.zero_grad()
    total, units = 0.0, 0
    for batch in batches:
        loss = token_loss_sum(model, batch)
        loss.backward()
        total += loss.item()
        units += count_targets(batch)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return total, units, grad


def test_packed_loss_and_gradients_equal_unpacked(model, rows):
    alone = [collate([row], EOS) for row in rows]
    padded = [collate(rows, EOS)]  # one padded batch, as without packing
    packed = [collate(pack_rows(rows, 96), EOS)]
    reference = loss_and_grads(model, alone)
    for other in (loss_and_grads(model, padded), loss_and_grads(model, packed)):
        assert other[1] == reference[1]
        assert other[0] == pytest.approx(reference[0], rel=1e-5)
        assert float((other[2] - reference[2]).norm() / reference[2].norm()) < 1e-5


def test_without_position_ids_packed_samples_would_mix(model, rows):
    """The guard's premise: passing the usual padding mask instead leaks between samples."""
    packed = collate(pack_rows(rows, 96), EOS)
    with torch.no_grad():
        leaky = token_loss_sum(model, {k: v for k, v in packed.items() if k != "position_ids"}).item()
        isolated = token_loss_sum(model, packed).item()
        reference = sum(token_loss_sum(model, collate([r], EOS)).item() for r in rows)
    assert isolated == pytest.approx(reference, rel=1e-6)
    # Small on a tiny random model, but a hundred times beyond float error.
    assert abs(leaky - reference) > 100 * max(abs(isolated - reference), 1e-4)


def test_isolation_check_passes_for_llama_and_refuses_a_leaking_forward(tiny_model_dir, monkeypatch):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    batching._packing_leak.cache_clear()  # really build the check model
    state = torch.random.get_rng_state()
    check_packing_isolation(config)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's randomness is untouched
    batching._packing_leak.cache_clear()
    monkeypatch.setattr(batching, "model_inputs", lambda batch: {"input_ids": batch["input_ids"]})
    with pytest.raises(ConfigError, match="lets packed samples attend to each other") as info:
        check_packing_isolation(config)
    assert info.value.fix == "set packing: false."
    batching._packing_leak.cache_clear()


def test_flex_attention_keeps_packed_samples_apart(tiny_model_dir, rows):
    """flash_attn auto trains packed rows with flex_attention on a GPU; its forward (the CPU has no
    backward for it) gives the loss of the samples run alone."""
    torch.manual_seed(0)
    flex = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flex_attention").eval()
    packed = collate(pack_rows(rows, 96), EOS)
    with torch.no_grad():
        together = token_loss_sum(flex, packed).item()
        alone = sum(token_loss_sum(flex, collate([row], EOS)).item() for row in rows)
    assert together == pytest.approx(alone, rel=1e-5)
    batching._packing_leak.cache_clear()
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config._attn_implementation = "flex_attention"
    check_packing_isolation(config)  # the run's own guard agrees
    batching._packing_leak.cache_clear()


# --- pt -----------------------------------------------------------------------------------------

def test_pack_documents_cuts_blocks_and_restarts_positions(tokenizer, model):
    docs = [Document(" ".join(f"word{i}" for i in range(n))) for n in (5, 40, 3, 12)]
    encoded = [row for row, _ in TextEncoder(tokenizer, 16, "truncate", True).encode_records(docs)]
    blocks = pack_documents(encoded, 16)
    flat = [t for r in encoded for t in r.input_ids]
    assert [t for b in blocks for t in b.input_ids] == flat  # nothing dropped, order kept
    assert all(len(b.input_ids) == 16 for b in blocks[:-1])
    assert flat.count(EOS) == len(docs)
    # A document split over two blocks continues from position 0 in the next one.
    assert all(b.position_ids[0] == 0 for b in blocks)
    # Loss over blocks == loss over the same pieces run one by one.
    pieces = []
    for b in blocks:
        starts = [i for i, p in enumerate(b.position_ids) if p == 0] + [len(b.input_ids)]
        pieces += [EncodedRow(b.input_ids[x:y], b.input_ids[x:y]) for x, y in zip(starts, starts[1:])]
    with torch.no_grad():
        packed = token_loss_sum(model, collate(blocks, EOS)).item()
        alone = sum(token_loss_sum(model, collate([p], EOS)).item() for p in pieces)
    assert packed == pytest.approx(alone, rel=1e-5)


# --- through lmtune train -----------------------------------------------------------------------

def test_packed_training_step_equals_unpacked(tmp_path, train_config):
    """One optimizer step over all rows: same loss and gradient norm packed or not."""
    first = {}
    for packing in (False, True):
        out = tmp_path / f"out-{packing}"
        config = train_config | {"output_dir": str(out), "packing": packing, "cutoff_len": 96,
                                 "per_device_train_batch_size": 8, "max_steps": 1}
        assert main(["train", str(write_yaml(tmp_path / f"{packing}.yaml", config))]) == 0
        first[packing] = read_log(out / "trainer_log.jsonl")[0]
        report = json.loads((out / "data_report.json").read_text())
        assert (report["packing"] is not None) == packing
    assert first[True]["loss"] == pytest.approx(first[False]["loss"], rel=1e-5)
    assert first[True]["grad_norm"] == pytest.approx(first[False]["grad_norm"], rel=1e-4)
    packing = json.loads((Path(tmp_path / "out-True") / "data_report.json").read_text())["packing"]
    assert packing["samples"] == 8 and packing["rows"] < 8 and packing["capacity"] == 96


def test_isolation_check_ignores_a_bf16_stored_base(tiny_model_dir):
    # frozen_dtype: auto loads an adapter run's base in bf16, and its config then says so; the check
    # is about the attention mask and must not read bf16 rounding as a leak.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.dtype = torch.bfloat16
    batching._packing_leak.cache_clear()
    check_packing_isolation(config)
    batching._packing_leak.cache_clear()
