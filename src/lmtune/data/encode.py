"""Conversations -> token ids and labels, through the tokenizer's own chat template.

The template renders the whole conversation once; the ids are exactly what
`apply_chat_template(messages, tokenize=True)` gives. Which tokens train comes from rendering
prefixes: the text of an assistant reply starts where the prefix rendered with a generation prompt
ends, and stops at its end-of-turn token. Characters map to tokens through the fast tokenizer's
offsets, so one tokenisation serves the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lmtune.data.formats import Conversation, Message
from lmtune.data.report import EncodeCounts
from lmtune.errors import ModelError

IGNORE_INDEX = -100


@dataclass
class EncodedRow:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        # A label at position i is predicted from position i - 1, so position 0 never trains.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


class ChatEncoder:
    """Renders and tokenises conversations the same way for training and for chat."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int], cutoff_len: int):
        if not tokenizer.chat_template:
            raise ModelError(f"the tokenizer of {tokenizer.name_or_path} has no chat template.",
                             "use a chat (instruct) model, or a tokenizer folder with chat_template.jinja.")
        if not tokenizer.is_fast:
            raise ModelError(f"the tokenizer of {tokenizer.name_or_path} is not a fast tokenizer; "
                             "lmtune needs its character offsets to place labels.",
                             "use a model folder with a tokenizer.json.")
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.cutoff_len = cutoff_len

    def render(self, messages: list[Message], tools: str | None = None,
               add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        # Rendered templates already hold their special tokens; adding them again doubles BOS.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[Message], tools: str | None = None) -> list[int]:
        """Ids that ask the model for the next assistant reply: what chat feeds to generate()."""
        return self.tokenize(self.render(messages, tools, add_generation_prompt=True))

    def target_spans(self, conv: Conversation, text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant replies (with their end-of-turn marker) in `text`."""
        spans = []
        for i, message in enumerate(conv.messages):
            if message["role"] != "assistant":
                continue
            before = self.render(conv.messages[:i], conv.tools, add_generation_prompt=True)
            through = self.render(conv.messages[: i + 1], conv.tools)
            if not (text.startswith(before) and text.startswith(through)):
                raise ModelError(
                    f"the chat template of {self.tokenizer.name_or_path} renders a conversation "
                    "differently from its own prefixes, so replies cannot be located for masking.",
                    "use a template that renders earlier turns unchanged (most do).")
            spans.append((len(before), len(through)))
        return spans

    def encode(self, conv: Conversation) -> tuple[EncodedRow, bool]:
        """-> (row, truncated). The row may have no target left; the caller drops it."""
        text = self.render(conv.messages, conv.tools)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        token = 0
        for start, end in self.target_spans(conv, text):
            while token < len(ids) and offsets[token][0] < start:
                token += 1
            first = token
            while token < len(ids) and offsets[token][0] < end:
                token += 1
            span = range(first, token)
            # Train through the end-of-turn token and not past it (e.g. the newline after it).
            stops = [j for j in span if ids[j] in self.stop_ids]
            last = stops[-1] + 1 if stops else token
            for j in range(first, last):
                labels[j] = ids[j]
        truncated = len(ids) > self.cutoff_len
        return EncodedRow(ids[: self.cutoff_len], labels[: self.cutoff_len]), truncated

    def encode_all(self, conversations: list[Conversation], counts: EncodeCounts) -> list[EncodedRow]:
        rows = []
        for conv in conversations:
            row, truncated = self.encode(conv)
            if row.n_targets == 0:
                counts.dropped_no_target += 1
                continue
            rows.append(row)
            counts.truncated += truncated
            counts.rows += 1
            counts.tokens += len(row.input_ids)
            counts.target_tokens += row.n_targets
        return rows
