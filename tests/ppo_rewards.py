"""Reward functions for the ppo tests, loaded by `reward_model: tests.ppo_rewards:<name>`."""

from __future__ import annotations


def says_yes(prompts: list[str], replies: list[str]) -> list[float]:
    """1 for a reply that starts with 'Yes', else 0: a verifiable reward the policy can find by sampling."""
    return [1.0 if reply.strip().lower().startswith("yes") else 0.0 for reply in replies]


def letter_share(prompts: list[str], replies: list[str]) -> list[float]:
    """The share of a reply's characters that are ASCII letters: a dense reward that even a tiny
    random model (whose replies are random tokens) can climb."""
    return [sum(c.isascii() and c.isalpha() for c in r) / max(len(r), 1) for r in replies]
