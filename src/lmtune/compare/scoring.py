"""The task score of a trained variant: its greedy answers to the val split's prompts, counted right
when they equal the reference reply (exact) or hold the expected text (contains)."""

from __future__ import annotations

from typing import Any

from lmtune.config import RunConfig


def _normalise(text: str) -> str:
    return " ".join(text.split())


def task_score(cfg: RunConfig, mode: str, expect: str | None, max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of the trained output to the val split's prompts, and how many are right."""
    from peft import PeftModel

    from lmtune.data.formats import Conversation, fill_placeholders
    from lmtune.data.sources import load_conversations, split_validation
    from lmtune.infer.chat import ChatSession
    from lmtune.models.lineage import run_output
    from lmtune.models.methods import MERGEABLE

    conversations, _ = load_conversations(cfg)
    _, val = split_validation(conversations, cfg.val_size, cfg.seed)
    items = [(c.messages[:-1], c.messages[-1]["content"]) for c in val
             if c.messages and c.messages[-1]["role"] == "assistant"]
    if expect is not None:
        holder = Conversation([{"role": "user", "content": expect}])
        fill_placeholders(holder, cfg.data_vars)
        expect = holder.messages[0]["content"]
        items = [(prompt, ref) for prompt, ref in items if expect.lower() in ref.lower()]
    result: dict[str, Any] = {"mode": mode, "expect": expect, "hits": 0, "total": len(items),
                              "answers": []}
    if not items:
        return result
    session = ChatSession.load(cfg.model_copy(update={"max_new_tokens": max_new_tokens}),
                               *run_output(cfg))
    if isinstance(session.model, PeftModel) and session.model.active_peft_config.peft_type in MERGEABLE:
        # The same function, merged into the full-precision base chat loads: without it DoRA would
        # recompute every weight's norm for every generated token (minutes per variant on a CPU).
        session.model = session.model.merge_and_unload()
    single = [p[0]["content"] for p, _ in items if len(p) == 1 and p[0]["role"] == "user"]
    if len(single) == len(items):  # one user message each: generated together, left-padded
        answers = [a for i in range(0, len(single), 8) for a in session.reply_batch(single[i: i + 8])]
    else:
        answers = [session.reply(prompt, sample=False, stream=False) for prompt, _ in items]
    for (prompt, reference), answer in zip(items, answers):
        hit = (expect.lower() in answer.lower() if mode == "contains"
               else _normalise(answer) == _normalise(reference))
        result["hits"] += hit
        result["answers"].append({"prompt": prompt[-1]["content"], "answer": answer, "hit": hit})
    return result
