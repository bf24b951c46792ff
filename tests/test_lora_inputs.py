"""Plain LoRA layers under autocast give a bf16 input to their A matrix as it is: the same loss and
gradients as peft's round trip through fp32, bit for bit; layers with dropout or DoRA keep peft's
own handling."""

from __future__ import annotations

import torch

from lmtune.models.lora_inputs import pass_half_inputs_as_they_are, takes_input_as_is
from tests.conftest import method_model


def test_the_same_numbers_with_fewer_copies(tiny_model_dir):
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain, lean = method_model(tiny_model_dir), method_model(tiny_model_dir)
    assert pass_half_inputs_as_they_are(lean) == 7 * plain.config.num_hidden_layers
    results = []
    for model in (plain, lean):
        copies = []

        def count(t: torch.Tensor) -> torch.Tensor:
            base = t if t._base is None else t._base  # a linear layer keeps a 2-D view
            if base.grad_fn is not None and base.grad_fn.name() == "ToCopyBackward0":
                copies.append(t)
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        results.append((loss, len(copies), [p.grad for p in model.parameters() if p.requires_grad]))
    (loss_a, copies_a, grads_a), (loss_b, copies_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    # the attention's output (o_proj) and the MLP's product (down_proj) reach A unwidened
    assert copies_a - copies_b == 2 * plain.config.num_hidden_layers


def test_layers_whose_input_is_changed_first_keep_peft_handling(tiny_model_dir):
    dropout, dora = (method_model(tiny_model_dir, lora_dropout=0.1),
                     method_model(tiny_model_dir, use_dora=True))
    assert pass_half_inputs_as_they_are(dropout) == 0 and pass_half_inputs_as_they_are(dora) == 0
    assert not takes_input_as_is(torch.nn.Linear(2, 2))
