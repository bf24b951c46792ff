"""Terminal chat with a base model, an adapter, or what a training run left in output_dir.

Prompts are built by the same ChatEncoder as training, so the ids the model sees in chat are
token-for-token those it was trained on; generation stops at the end-of-turn token.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList,
                          TextIteratorStreamer, TextStreamer)

from lmtune.config import RunConfig
from lmtune.data.encode import ChatEncoder
from lmtune.data.formats import Message, fill_placeholders, Conversation
from lmtune.durable import write_file
from lmtune.errors import DataError, ModelError
from lmtune.models.lineage import weights_of
from lmtune.models.load import (load_model, load_tokenizer, model_options, resolve_for, stop_token_ids,
                                tokenizer_source)
from lmtune.models.methods import load_adapters
from lmtune.models.scalar_head import HEAD_FILE


@dataclass
class ChatSession:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    encoder: ChatEncoder
    cfg: RunConfig

    @classmethod
    def from_config(cls, cfg: RunConfig, use_trained: bool = True) -> "ChatSession":
        """The model and adapters `weights_of(cfg, use_trained)` names."""
        model_name, adapters = weights_of(cfg, use_trained)
        out = Path(cfg.output_dir) if cfg.output_dir else None
        if out and (out / HEAD_FILE).is_file() and out in {Path(model_name), *map(Path, adapters)}:
            raise ModelError(f"{cfg.output_dir} holds a reward model: it scores answers, it "
                             "does not write them.",
                             "score with lmtune.train.rm.RewardModel(output_dir).score(prompts, "
                             "replies), use it as reward_model of stage ppo, or chat with --base.")
        return cls.load(cfg, model_name, adapters)

    @classmethod
    def load(cls, cfg: RunConfig, model_name: str, adapters: list[str]) -> "ChatSession":
        model_path = resolve_for(cfg, model_name)
        tokenizer = load_tokenizer(tokenizer_source(model_path, adapters), cfg.trust_remote_code)
        model = load_model(model_path, cfg.trust_remote_code, **model_options(cfg))
        if adapters:
            model = load_adapters(model, adapters, trainable_last=False)
        model.eval()
        source = f"{model_name}" + (f" + adapter {', '.join(adapters)}" if adapters else "")
        print(f"model: {source}")
        encoder = ChatEncoder(tokenizer, stop_token_ids(tokenizer, model), cfg.cutoff_len,
                              default_system=cfg.default_system, enable_thinking=cfg.enable_thinking)
        return cls(model, tokenizer, encoder, cfg)

    def _generation_kwargs(self, sample: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.cfg.max_new_tokens, "do_sample": sample,
                                  "eos_token_id": sorted(self.encoder.stop_ids),
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "repetition_penalty": self.cfg.repetition_penalty}
        if sample:
            kwargs |= {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "top_k": self.cfg.top_k}
        else:  # the model's generation_config may carry sampling defaults; greedy ignores them
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        return kwargs

    @torch.no_grad()
    def reply(self, messages: list[Message], sample: bool, stream: bool = True) -> str:
        ids = torch.tensor([self.encoder.prompt_ids(messages)])
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                  **self._generation_kwargs(sample))
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    @torch.no_grad()
    def reply_batch(self, prompts: list[str], sample: bool = False) -> list[str]:
        """One user message each, generated together with left padding."""
        encoded = [self.encoder.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        out = self.model.generate(input_ids=ids, attention_mask=mask, **self._generation_kwargs(sample))
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def answer_once(self, prompt: str, sample: bool = False) -> str:
        return self.reply([{"role": "user", "content": prompt}], sample=sample)

    def stream(self, messages: list[Message], sample: bool) -> Iterator[str]:
        """The reply as text pieces while they are generated (generation runs in a thread). Closing
        the iterator early stops generation at the next token."""
        ids = torch.tensor([self.encoder.prompt_ids(messages)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        stop = StoppingCriteriaList([_Cancelled(cancelled)])

        failed: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        streamer=streamer, stopping_criteria=stop,
                                        **self._generation_kwargs(sample))
            except BaseException as exc:  # handed to the reader, whose loop would wait forever
                failed.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:
            cancelled.set()
            worker.join()
        if failed:
            raise failed[0]


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> bool:
        return self.event.is_set()


def interactive(session: ChatSession) -> None:
    print("Type a message. 'clear' forgets the conversation, 'exit' quits.")
    history: list[Message] = []
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            break
        if text in ("exit", "quit"):
            break
        if text == "clear":
            history = []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        answer = session.reply(history, sample=session.cfg.do_sample)
        history.append({"role": "assistant", "content": answer})


def read_prompts(path: str, data_vars: dict[str, str]) -> list[dict[str, Any]]:
    """A JSON list of {prompt | instruction, expect?, kind?}; {{key}} filled from data_vars."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read prompts: byte {exc.start} is not UTF-8 text",
                        "save the file as UTF-8.", file=path) from None
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200]
        raise DataError(f"cannot read prompts: {reason}", "give a JSON list of objects with a "
                        "'prompt'.", file=path) from None
    prompts = []
    for index, item in enumerate(items if isinstance(items, list) else [None]):
        text = item.get("prompt", item.get("instruction")) if isinstance(item, dict) else None
        if not isinstance(text, str) or not text:
            raise DataError("needs a 'prompt' text", "write {\"prompt\": \"...\"}.", file=path, record=index)
        conv = Conversation([{"role": "user", "content": text},
                             {"role": "assistant", "content": item.get("expect") or ""}])
        fill_placeholders(conv, data_vars)
        prompts.append({"prompt": conv.messages[0]["content"], "expect": conv.messages[1]["content"],
                        "kind": item.get("kind", "")})
    return prompts


def answer_file(session: ChatSession, path: str, data_vars: dict[str, str], save: str | None = None,
                sample: bool = False, batch_size: int = 8) -> list[dict[str, Any]]:
    """Answer every prompt of a file; print each answer and, where `expect` is given, the hit count."""
    items = read_prompts(path, data_vars)
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        for item, answer in zip(chunk, session.reply_batch([i["prompt"] for i in chunk], sample)):
            item["answer"] = answer
            item["hit"] = bool(item["expect"]) and item["expect"].lower() in answer.lower()
            mark = ("[ok] " if item["hit"] else "[miss] ") if item["expect"] else ""
            print(f"\nQ: {item['prompt']}\nA: {mark}{answer}")
    tallies: dict[str, list[int]] = {}
    for item in items:
        if item["expect"]:
            tally = tallies.setdefault(item["kind"] or "all", [0, 0])
            tally[0] += item["hit"]
            tally[1] += 1
    for kind, (hits, total) in tallies.items():
        print(f"{kind}: {hits}/{total} answers contain the expected text")
    if save:
        records = [{"instruction": i["prompt"], "input": "", "output": i["answer"]}
                   | ({"expect": i["expect"], "hit": i["hit"]} if i["expect"] else {}) for i in items]
        write_file(Path(save), json.dumps(records, indent=2, ensure_ascii=False) + "\n",
                   "the answers (--save)")
        print(f"answers saved to {save}")
    return items
