"""chunked_cross_entropy: the output head and its loss a chunk of target positions at a time give the
plain path's values and gradients (hidden states, the head's weight and bias; fp32, bf16 autocast,
a bf16-stored head), on a real model through every stage's forward, while holding no batch-sized
logits for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lmtune.models.precision import UpcastLinear
from lmtune.train import head_loss
from lmtune.train.forward import response_logps, token_loss_and_hits
from tests.test_precision import batch, build


def lora_model(model_dir: str) -> torch.nn.Module:
    """LoRA r4 on every linear layer, fp32, lora_B drawn so that every factor has a gradient."""
    return build(model_dir, "lora", "float32", bf16=False)

VOCAB, HIDDEN, ROWS = 97, 16, 40


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so that a test's 40 rows take six chunks, the last one short; a head
    stored in another dtype than it computes in is cast 10 vocabulary rows at a time (ten slices,
    the last one short)."""
    monkeypatch.setitem(head_loss.CHUNK_BYTES, "cpu", 7 * 4 * VOCAB)
    monkeypatch.setattr(head_loss, "SLICE_ROWS", 10)


def inputs(bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=g, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g))
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    return hidden, head, labels


def grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_summed_loss_equals_cross_entropy_in_value_hits_and_gradients(bias):
    hidden, head, labels = inputs(bias)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    logits = head(hidden)
    plain = F.cross_entropy(logits, labels, reduction="sum")
    (plain * 0.3).backward()
    expected = grads(*params)
    total, hits = head_loss.summed_loss(head_loss.linear_head(head, hidden), hidden, labels)
    (total * 0.3).backward()
    assert total.item() == pytest.approx(plain.item(), rel=1e-6)
    assert hits.item() == int((logits.argmax(-1) == labels).sum())
    for got, want in zip(grads(*params), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_token_logps_equal_log_softmax_in_value_and_gradients():
    hidden, head, labels = inputs()
    params = [hidden, head.weight, head.bias]
    upstream = torch.randn(ROWS, generator=torch.Generator().manual_seed(5))
    plain = -F.cross_entropy(head(hidden), labels, reduction="none")
    (plain * upstream).sum().backward()
    expected = grads(*params)
    chunked = head_loss.token_logps(head_loss.linear_head(head, hidden), hidden, labels)
    (chunked * upstream).sum().backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(*params), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_plain_path_under_autocast():
    hidden, head, labels = inputs()
    params = [hidden, head.weight, head.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    plain.backward()
    expected = grads(*params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = head_loss.linear_head(head, hidden)
        total, _ = head_loss.summed_loss(fused, hidden, labels)
    total.backward()
    assert fused.dtype == torch.bfloat16
    # The same bf16 products; the sums over chunks are fp32 where one matmul rounds its whole sum
    # to bf16 once, so elements differ by bf16 rounding, the tensors by far less.
    assert total.item() == pytest.approx(plain.item(), rel=1e-4)
    for got, want in zip(grads(*params), expected):
        assert got.dtype == want.dtype
        assert (got - want).norm() <= 5e-3 * want.norm()


def bf16_stored_frozen_head(bias: bool) -> tuple[torch.Tensor, torch.nn.Module, torch.Tensor]:
    hidden, head, labels = inputs(bias=bias)
    with torch.no_grad():
        head.weight.data = head.weight.data.bfloat16()
    head.weight.requires_grad_(False)
    head.__class__ = UpcastLinear
    return hidden, head, labels


@pytest.mark.parametrize("bias", [True, False])
def test_a_bf16_stored_frozen_head_computes_in_fp32(bias):
    """Its weight is cast up a slice of the vocabulary at a time (never whole): the loss, the hits
    and the gradients are the plain fp32 path's on the stored values."""
    hidden, head, labels = bf16_stored_frozen_head(bias)
    logits = head(hidden)
    plain = F.cross_entropy(logits, labels, reduction="sum")
    plain.backward()
    expected = grads(hidden, *([head.bias] if bias else []))
    total, hits = head_loss.summed_loss(head_loss.linear_head(head, hidden), hidden, labels)
    total.backward()
    assert total.item() == pytest.approx(plain.item(), rel=1e-6)
    assert hits.item() == int((logits.argmax(-1) == labels).sum())
    for got, want in zip(grads(hidden, *([head.bias] if bias else [])), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_bf16_stored_frozen_head_gives_token_logps_in_fp32():
    hidden, head, labels = bf16_stored_frozen_head(bias=True)
    upstream = torch.randn(ROWS, generator=torch.Generator().manual_seed(5))
    plain = -F.cross_entropy(head(hidden), labels, reduction="none")
    (plain * upstream).sum().backward()
    expected = grads(hidden, head.bias)
    chunked = head_loss.token_logps(head_loss.linear_head(head, hidden), hidden, labels)
    (chunked * upstream).sum().backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(hidden, head.bias), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast"])
@pytest.mark.parametrize("bias", [True, False])
def test_a_frozen_head_in_one_pass_matches_the_plain_path(precision, bias):
    """The adapter methods' case: neither weight nor bias trains, so one pass over the vocabulary
    slices gives the loss, the hits and the hidden states' gradient."""
    hidden, head, labels = inputs(bias)
    head.requires_grad_(False)
    autocast = precision == "bf16 autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = head(hidden).float()
        plain = F.cross_entropy(logits, labels, reduction="sum")
    plain.backward()
    (expected,) = grads(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, hits = head_loss.summed_loss(head_loss.linear_head(head, hidden), hidden, labels)
    total.backward()
    assert hits.item() == int((logits.argmax(-1) == labels).sum())
    if autocast:  # bf16 products summed in another order: within bf16 rounding
        assert total.item() == pytest.approx(plain.item(), rel=1e-4)
        assert (hidden.grad - expected).norm() <= 5e-3 * expected.norm()
    else:
        assert total.item() == pytest.approx(plain.item(), rel=1e-6)
        torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)


def test_one_pass_ranks_ties_as_argmax_does():
    """Equal logits in different slices: the first one counts as the model's top choice."""
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    hidden = torch.zeros(3, HIDDEN)  # every logit 0
    labels = torch.tensor([0, 15, 0])
    _, hits = head_loss.summed_loss(head_loss.linear_head(head, hidden), hidden, labels)
    assert hits.item() == 2


def test_without_grad_nothing_is_formed_and_the_value_holds():
    hidden, head, labels = inputs()
    with torch.no_grad():
        total, _ = head_loss.summed_loss(head_loss.linear_head(head, hidden), hidden, labels)
        assert total.item() == pytest.approx(F.cross_entropy(head(hidden), labels, reduction="sum").item(),
                                             rel=1e-6)
    assert total.grad_fn is None


def test_chunks_fill_whole_tiles_where_they_are_large():
    assert head_loss.chunk_rows(128256, "cuda") == 512  # 523 by the budget, whole 128-row tiles
    assert head_loss.chunk_rows(97, "cpu") == 7  # the fixture's budget: under a tile, as it is


def test_only_a_plain_linear_head_is_chunked(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    hidden = torch.zeros(1, model.config.hidden_size)
    assert head_loss.linear_head(model.get_output_embeddings(), hidden) is not None
    on_head = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    assert head_loss.linear_head(on_head.get_base_model().get_output_embeddings(), hidden) is None
    assert head_loss.linear_head(torch.nn.Embedding(3, 4), hidden) is None


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn runs (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_real_model_loss_and_lora_gradients_match_and_logits_are_not_kept(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(head_loss.CHUNK_BYTES, "cpu", 16 * 4 * 49152)  # 60 targets: four chunks
    model, data = lora_model(tiny_model_dir), batch()
    trained = [p for p in model.parameters() if p.requires_grad]
    results, kept = {}, {}
    for chunked in (False, True):
        def step():
            total, hits = token_loss_and_hits(model, data, chunked)
            (total / 60).backward()
            results[chunked] = (total.item(), hits.item(), grads(*trained))
        kept[chunked] = saved_bytes(step)
    (plain_loss, plain_hits, plain_grads), (loss, hits, chunked_grads) = results[False], results[True]
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert hits == plain_hits
    for got, want in zip(chunked_grads, plain_grads):
        assert (got - want).norm() <= 1e-4 * want.norm()  # fp32, summed in another order
    logits_bytes = 60 * 49152 * 4
    assert kept[False] - kept[True] > logits_bytes  # the plain path keeps the logits, fp32


def test_real_model_response_logps_and_gradients_match(tiny_model_dir):
    model, data = lora_model(tiny_model_dir), batch()
    trained = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for chunked in (False, True):
        logps, counts = response_logps(model, data, chunked)
        (logps[0] - 0.5 * logps[1]).backward()  # rows weighted unequally, as preference losses do
        results[chunked] = (logps.detach(), counts, grads(*trained))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-4)
    assert results[True][1].tolist() == results[False][1].tolist() == [30, 30]
    for got, want in zip(results[True][2], results[False][2]):
        assert (got - want).norm() <= 1e-4 * want.norm()  # fp32, summed in another order


def test_full_fine_tuning_trains_the_tied_head_the_same(tiny_model_dir):
    model, data = AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    results = {}
    for chunked in (False, True):
        total, _ = token_loss_and_hits(model, data, chunked)
        total.backward()
        results[chunked] = grads(*model.parameters())
    for got, want in zip(results[True], results[False]):
        assert (got - want).norm() <= 1e-4 * want.norm()  # fp32, summed in another order
