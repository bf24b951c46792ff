"""The task score of a trained variant: its greedy answers to the val split's prompts, counted right
when they equal the reference reply (exact) or hold the expected text (contains); and its benchmark
accuracy (eval_task), asked of the same loaded model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from lmtune.config import RunConfig

if TYPE_CHECKING:
    from lmtune.infer.chat import ChatSession


def _normalise(text: str) -> str:
    return " ".join(text.split())


def trained_session(cfg: RunConfig, max_new_tokens: int) -> ChatSession:
    """The run's saved output, loaded as `lmtune chat` loads it (a quantized run's adapter on the
    full-precision base), weight adapters merged."""
    from peft import PeftModel

    from lmtune.infer.chat import ChatSession
    from lmtune.models.lineage import run_output
    from lmtune.models.methods import MERGEABLE

    session = ChatSession.load(cfg.model_copy(update={"max_new_tokens": max_new_tokens}),
                               *run_output(cfg))
    if isinstance(session.model, PeftModel) and session.model.active_peft_config.peft_type in MERGEABLE:
        # The same function, merged into the full-precision base chat loads: without it DoRA would
        # recompute every weight's norm for every generated token (minutes per variant on a CPU).
        session.model = session.model.merge_and_unload()
    return session


def benchmark_accuracy(cfg: RunConfig, session: ChatSession, label: str,
                       eval_keys: dict[str, Any]) -> dict[str, Any]:
    """`lmtune eval`'s scoring of the loaded model on eval_keys' task: accuracy and per category."""
    from lmtune.evaluate.benchmarks import AVERAGE, evaluate_config

    scores = evaluate_config(cfg.model_copy(update=eval_keys), session.model, session.tokenizer, label)
    categories = scores.categories()
    return {"task": scores.task, "accuracy": categories[AVERAGE], "categories": categories,
            "questions": sum(len(s.answers) for s in scores.subjects)}


def task_score(cfg: RunConfig, mode: str, expect: str | None,
               session: Callable[[], ChatSession]) -> dict[str, Any]:
    """Greedy answers of the trained output (`session()`, loaded only when some val row is scored)
    to the val split's prompts, and how many are right."""
    from lmtune.data.formats import Conversation, fill_placeholders
    from lmtune.data.sources import load_conversations, split_validation

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
    chat = session()
    single = [p[0]["content"] for p, _ in items if len(p) == 1 and p[0]["role"] == "user"]
    if len(single) == len(items):  # one user message each: generated together, left-padded
        answers = [a for i in range(0, len(single), 8) for a in chat.reply_batch(single[i: i + 8])]
    else:
        answers = [chat.reply(prompt, sample=False, stream=False) for prompt, _ in items]
    for (prompt, reference), answer in zip(items, answers):
        hit = (expect.lower() in answer.lower() if mode == "contains"
               else _normalise(answer) == _normalise(reference))
        result["hits"] += hit
        result["answers"].append({"prompt": prompt[-1]["content"], "answer": answer, "hit": hit})
    return result
