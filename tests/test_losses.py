"""Every stage objective against a hand computation on fixed numbers (worked out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from lmtune.train.losses import (AdaptiveKL, bradley_terry, gae, kl_penalised_rewards, kto_loss,
                                 orpo_odds_ratio_loss, ppo_policy_loss, ppo_value_loss,
                                 preference_loss, whiten)

t = torch.tensor


def test_bradley_terry():
    # -log sigmoid(2 - 0.5) = log(1 + e^-1.5) = 0.201413
    assert bradley_terry(t([2.0]), t([0.5])).item() == pytest.approx(0.201413, abs=1e-6)


# policy prefers chosen by 2 nats more than the reference: h = (-10 + 11) - (-12 + 11) = 2
POLICY, REF = (t([-10.0]), t([-12.0])), (t([-11.0]), t([-11.0]))


@pytest.mark.parametrize("kind, smoothing, expected", [
    ("sigmoid", 0.0, 0.598139),   # log(1 + e^-0.2)
    ("sigmoid", 0.1, 0.618139),   # 0.9 * 0.598139 + 0.1 * log(1 + e^0.2) = 0.538325 + 0.079814
    ("ipo", 0.0, 9.0),            # (2 - 1 / (2 * 0.1))^2 = (2 - 5)^2
    ("hinge", 0.0, 0.8),          # relu(1 - 0.1 * 2)
])
def test_reference_preference_losses(kind, smoothing, expected):
    loss = preference_loss(kind, 0.1, *POLICY, *REF, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_simpo_needs_no_reference():
    # beta 2, gamma 0.5, average log-probs -0.5 vs -1.0: -log sigmoid(2 * 0.5 - 0.5) = 0.474077
    loss = preference_loss("simpo", 2.0, t([-0.5]), t([-1.0]), simpo_gamma=0.5)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    with pytest.raises(ValueError):
        preference_loss("sigmoid", 0.1, *POLICY)


def test_orpo_odds_ratio():
    # p_chosen 0.5 -> odds 1; p_rejected 0.25 -> odds 1/3; log odds ratio = log 3
    # -0.1 * log sigmoid(log 3) = 0.1 * log(4/3) = 0.0287682
    loss = orpo_odds_ratio_loss(0.1, t([math.log(0.5)]), t([math.log(0.25)]))
    assert loss.item() == pytest.approx(0.0287682, abs=1e-6)


def test_kto():
    # beta 0.5, KL reference point 0.4
    # desirable, log ratio 1: 1 - sigmoid(0.5 * 0.6) = 0.425557
    # undesirable, log ratio -1, weight 2: 2 * (1 - sigmoid(0.5 * 1.4)) = 0.663624
    loss = kto_loss(0.5, t([-5.0, -7.0]), t([-6.0, -6.0]), t([True, False]), t(0.4),
                    chosen_weight=1.0, rejected_weight=2.0)
    assert loss.tolist() == pytest.approx([0.425557, 0.663624], abs=1e-6)


def test_gae_with_a_finished_row():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * 0.385
    # row 1: the third token is past the end: A1 = 1 - 0.6 = 0.4, A0 = 0.1 + 0.95 * 0.4
    assert advantages.tolist() == [pytest.approx([0.46575, 0.385, 0.3]),
                                   pytest.approx([0.48, 0.4, 0.0])]
    assert returns[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])
    assert returns[1, 2].item() == 0.0


def test_ppo_clipped_policy_loss():
    # ratios 1.5, 0.5, 1.1 with advantages 1, -1, 1 and clip 0.2:
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
    # token 2: ratio inside the range, -1.1. Mean -0.5, clip active on 2 of 3 tokens.
    logps = torch.log(t([[1.5, 0.5, 1.1]]))
    loss, clip_fraction = ppo_policy_loss(logps, torch.zeros(1, 3), t([[1.0, -1.0, 1.0]]),
                                          torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(2 / 3)


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    # (1 - 0)^2 = 1 vs (0.7 - 0)^2; (2 - 0)^2 = 4 vs 0.49 -> 0.5 * mean(1, 4) = 1.25
    loss = ppo_value_loss(t([[1.0, 2.0]]), t([[0.5, 0.5]]), torch.zeros(1, 2), torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(1.25)


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    rewards, kl = kl_penalised_rewards(t([2.0]), t([[-1.0, -2.0, -3.0, 0.0]]),
                                       t([[-1.5, -2.0, -2.0, 0.0]]), t([[1.0, 1.0, 1.0, 0.0]]), 0.1)
    assert kl.tolist() == [[0.5, 0.0, -1.0, 0.0]]
    assert rewards.tolist() == [pytest.approx([-0.05, 0.0, 2.1, 0.0])]


def test_adaptive_kl_moves_toward_the_target():
    controller = AdaptiveKL(0.2, target=6.0, horizon=10_000)
    # KL 9 is 50% over target, clipped to 20%: 0.2 * (1 + 0.2 * 100 / 10000) = 0.2004
    assert controller.update(9.0, 100) == pytest.approx(0.2004)
    # KL 3 is 50% under: clipped to -20%
    assert controller.update(3.0, 100) == pytest.approx(0.2004 * (1 - 0.002))
    assert AdaptiveKL(0.2, target=None).update(100.0, 100) == 0.2  # fixed coefficient


def test_whiten_masked():
    values, mask = t([[1.0, 3.0, 100.0]]), t([[1.0, 1.0, 0.0]])
    out = whiten(values, mask)
    assert out.tolist() == [pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)]
