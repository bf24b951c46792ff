"""The objectives of the preference and RL stages, as plain functions of tensors.

Each takes per-sequence (or per-token) log-probabilities, rewards or values that the stage computed,
so it can be checked against a hand computation on fixed numbers. Conventions: `*_logps` are summed
log-probabilities of a response's target tokens; `*_avg_logps` the same divided by its token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def preference_loss(kind: str, beta: float, policy_chosen_logps: torch.Tensor,
                    policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
                    ref_rejected_logps: torch.Tensor | None = None, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5) -> torch.Tensor:
    """Per-pair loss of DPO (sigmoid), IPO, hinge or SimPO.

    For SimPO the policy log-probabilities must be length-averaged and no reference is used."""
    if kind == "simpo":
        margin = policy_chosen_logps - policy_rejected_logps
        return -F.logsigmoid(beta * margin - simpo_gamma)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"pref_loss {kind} needs reference log-probabilities")
    # How much more the policy prefers chosen over rejected than the reference does.
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if kind == "sigmoid":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                - label_smoothing * F.logsigmoid(-beta * h))
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown preference loss {kind}")


def orpo_odds_ratio_loss(beta: float, chosen_avg_logps: torch.Tensor,
                         rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's preference term per pair: -beta * log sigmoid(log odds(chosen) - log odds(rejected)),
    odds(p) = p / (1 - p) on length-averaged probabilities. The SFT term is added by the stage."""
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        torch.log1p(-torch.exp(chosen_avg_logps)) - torch.log1p(-torch.exp(rejected_avg_logps)))
    return -beta * F.logsigmoid(log_odds)


def kto_loss(beta: float, policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_estimate: torch.Tensor, chosen_weight: float = 1.0,
             rejected_weight: float = 1.0) -> torch.Tensor:
    """KTO per example: desirable answers are pushed above the reference point (the KL estimate),
    undesirable ones below it; `desirable` is a bool tensor, `kl_estimate` a detached scalar >= 0."""
    log_ratio = policy_logps - ref_logps
    chosen = chosen_weight * (1 - torch.sigmoid(beta * (log_ratio - kl_estimate)))
    rejected = rejected_weight * (1 - torch.sigmoid(beta * (kl_estimate - log_ratio)))
    return torch.where(desirable, chosen, rejected)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked entries (and zero mean if shift_mean)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens -> (advantages, returns).

    A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, with V and A zero
    past the last response token (mask 0)."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m
        advantages[:, t] = advantage
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_advantage = torch.where(m.bool(), advantage, next_advantage)
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective -> (loss, fraction of tokens where the clip was active)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), masked mean."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_penalised_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (log pi - log ref) on every response token, plus the sequence
    score on its last token -> (rewards, per-token KL)."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = mask.cumsum(-1).argmax(-1)  # index of the last response token per row
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


class AdaptiveKL:
    """KL coefficient that moves toward a target KL (proportional control, horizon in samples)."""

    def __init__(self, init_coef: float, target: float | None, horizon: int = 10_000):
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, current_kl / self.target - 1))
            self.value *= 1 + error * n_samples / self.horizon
        return self.value


# --- token-loss rules of sft (use_dft_loss, use_eaft_loss, use_asft_loss) ---------------------------

def dft_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DFT per target token: its cross-entropy times its probability under the model, the weight
    detached (it scales the gradient, it is not trained). `logits` [n, vocab], `labels` [n]."""
    nll = F.cross_entropy(logits.float(), labels, reduction="none")
    return nll * torch.exp(-nll.detach())


def eaft_token_losses(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """EAFT per target token: its cross-entropy times (H / 3) ** alpha, H the entropy of the model's
    distribution renormalised over its 20 most likely tokens (detached)."""
    logits = logits.float()
    nll = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        top = torch.log_softmax(logits.topk(min(20, logits.shape[-1]), dim=-1).values, dim=-1)
        entropy = -(top.exp() * top).sum(-1)
    return nll * (entropy / 3.0) ** alpha


def asft_token_losses(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """ASFT per target token: the DFT loss plus alpha x KL(reference || model) over the vocabulary
    at that position; `ref_logits` come from the model before training, without gradients."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return dft_token_losses(logits, labels) + alpha * kl
