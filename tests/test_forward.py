"""The forward helpers the stages share, against hand computations on a bigram model whose
next-token probabilities are written out below."""

from __future__ import annotations

import math

import pytest
import torch

from lmtune.data.encode import IGNORE_INDEX
from lmtune.train.forward import count_targets, response_logps, token_loss_sum

# p(next | current) for a 3-token vocabulary; each row sums to 1.
NEXT = torch.tensor([[1 / 2, 1 / 4, 1 / 4],
                     [1 / 4, 1 / 2, 1 / 4],
                     [1 / 4, 1 / 4, 1 / 2]])


class Bigram(torch.nn.Module):
    """The hidden state is the one-hot current token and the output head holds log p(next | current),
    so the logits at a position are exactly log NEXT[current]."""

    class Decoder(torch.nn.Module):
        def forward(self, input_ids, **_):
            return type("Out", (), {"last_hidden_state": torch.eye(3)[input_ids]})

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {})()
        self.decoder = self.Decoder()
        self.head = torch.nn.Linear(3, 3, bias=False)
        self.head.weight.data = NEXT.log().T.contiguous()  # head(one_hot(c)) = log NEXT[c]

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


X = IGNORE_INDEX
BATCH = {
    # row 0: 0 -> 1 (1/4), 1 -> 2 (1/4), 2 -> 2 (1/2): log p = -2 ln 4 - ln 2 = -5 ln 2, 3 targets
    # row 1: its first two tokens are prompt, then 0 -> 0 (1/2), then padding: -ln 2, 1 target
    "input_ids": torch.tensor([[0, 1, 2, 2], [2, 0, 0, 0]]),
    "labels": torch.tensor([[X, 1, 2, 2], [X, X, 0, X]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
}


@pytest.mark.parametrize("chunked", [True, False])
def test_response_logps_sums_each_rows_targets_by_hand(chunked):
    logps, counts = response_logps(Bigram(), BATCH, chunked)
    assert logps.tolist() == pytest.approx([-5 * math.log(2), -math.log(2)])
    assert counts.tolist() == [3, 1]


@pytest.mark.parametrize("chunked", [True, False])
def test_token_loss_sum_is_minus_the_sum_of_every_target_log_prob(chunked):
    assert token_loss_sum(Bigram(), BATCH, chunked).item() == pytest.approx(6 * math.log(2))
    assert count_targets(BATCH) == 4
