"""Canonical records -> token ids and labels: chat template rendering, label masking, cutoff policy.

Conversations render through the tokenizer's chat template once; the ids are exactly what
`apply_chat_template(messages, tokenize=True)` gives. Which tokens train comes from rendering
prefixes: an assistant reply starts where the prefix rendered with a generation prompt ends, and
stops at its end-of-turn token. Characters map to tokens through the fast tokenizer's offsets, so one
tokenizer call serves a whole batch of conversations.

Preference pairs and KTO examples encode their prompt once, shared by the replies. Plain text (pt)
is tokenized with EOS after every document.

Over-long rows follow `cutoff_policy`: `truncate` keeps the first cutoff_len tokens, dropping
earlier turns when that is the only way to keep a target token (so a row is never kept without
one); `drop` removes the row. Every outcome is a status the report counts.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lmtune.data.formats import (Conversation, Document, KTOExample, Message, PreferenceExample,
                                 Record)
from lmtune.errors import ModelError

IGNORE_INDEX = -100

# What encoding did to a record; the report counts each.
KEPT, TRUNCATED, OVER_LONG, NO_TARGET = "kept", "truncated", "over_long", "no_target"


@dataclass
class EncodedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # packed rows only: restart at 0 for every sample

    @property
    def n_targets(self) -> int:
        # A label at position i is predicted from position i - 1, so position 0 never trains.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def length(self) -> int:
        return len(self.input_ids)


def _targets(labels: list[int]) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)


@dataclass
class PreferenceRow:
    """A prompt encoded once and two replies that continue it; labels cover the replies only."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]

    def _row(self, ids: list[int], labels: list[int]) -> EncodedRow:
        return EncodedRow(self.prompt_ids + ids, [IGNORE_INDEX] * len(self.prompt_ids) + labels)

    def chosen_row(self) -> EncodedRow:
        return self._row(self.chosen_ids, self.chosen_labels)

    def rejected_row(self) -> EncodedRow:
        return self._row(self.rejected_ids, self.rejected_labels)

    @property
    def n_targets(self) -> int:
        return _targets(self.chosen_labels) + _targets(self.rejected_labels)

    @property
    def n_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class KTORow:
    """A prompt, one reply continuing it (labels on the reply), and whether the reply is desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_labels: list[int]
    desirable: bool

    def row(self) -> EncodedRow:
        return EncodedRow(self.prompt_ids + self.completion_ids,
                          [IGNORE_INDEX] * len(self.prompt_ids) + self.completion_labels)

    @property
    def n_targets(self) -> int:
        return _targets(self.completion_labels)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def length(self) -> int:
        return self.n_tokens


Row = EncodedRow | PreferenceRow | KTORow
Result = tuple[Row | None, str]


def drop_first_exchange(messages: list[Message]) -> list[Message] | None:
    """The conversation without its oldest exchange (system kept), or None if none is left to drop.

    Exchanges are dropped in pairs, then up to a user turn, so turns still alternate and start with
    the user."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    # Keep at least the last user turn and what follows it.
    last_user = max((i for i, m in enumerate(body) if m["role"] == "user"), default=0)
    cut = 2
    while cut < len(body) and body[cut]["role"] != "user":
        cut += 2
    if cut > last_user:
        return None
    return head + body[cut:]


class ChatEncoder:
    """Renders and tokenises conversations the same way for training and for chat."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int], cutoff_len: int, *,
                 train_on_prompt: bool = False, mask_history: bool = False,
                 cutoff_policy: str = "truncate", default_system: str | None = None,
                 enable_thinking: bool | None = None):
        if not tokenizer.chat_template:
            raise ModelError(f"the tokenizer of {tokenizer.name_or_path} has no chat template.",
                             "use a chat (instruct) model, a tokenizer folder with chat_template.jinja, "
                             "or set template: to a built-in (see `lmtune train --help`).")
        if not tokenizer.is_fast:
            raise ModelError(f"the tokenizer of {tokenizer.name_or_path} is not a fast tokenizer; "
                             "lmtune needs its character offsets to place labels.",
                             "use a model folder with a tokenizer.json.")
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.cutoff_len = cutoff_len
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self.cutoff_policy = cutoff_policy
        self.default_system = default_system
        # Reasoning templates (Qwen3 and kin) read it: false puts an empty reasoning block in the
        # prompt, so replies train without one; None leaves the template's own default.
        self.template_kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}

    def render(self, messages: list[Message], tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> str:
        if self.default_system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            **self.template_kwargs)

    def tokenize(self, text: str) -> list[int]:
        # Rendered templates already hold their special tokens; adding them again doubles BOS.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """Ids that ask the model for the next assistant reply: what chat feeds to generate()."""
        return self.tokenize(self.render(messages, tools, add_generation_prompt=True))

    def _prefix_error(self) -> ModelError:
        return ModelError(
            f"the chat template of {self.tokenizer.name_or_path} renders a conversation "
            "differently from its own prefixes, so replies cannot be located for masking.",
            "use a template that renders earlier turns unchanged (most do).")

    def target_spans(self, conv: Conversation, text: str) -> list[tuple[int, int]]:
        """Character spans of the trained replies (with their end-of-turn marker) in `text`."""
        spans = []
        last = len(conv.messages) - 1
        for i, message in enumerate(conv.messages):
            if message["role"] != "assistant" or (self.mask_history and i != last):
                continue
            before = self.render(conv.messages[:i], conv.tools, add_generation_prompt=True)
            # The whole conversation is already rendered: its last reply needs no second render.
            through = text if i == last else self.render(conv.messages[: i + 1], conv.tools)
            if not (text.startswith(before) and text.startswith(through)):
                raise self._prefix_error()
            spans.append((len(before), len(through)))
        return spans

    def _labels(self, ids: list[int], offsets: list[tuple[int, int]],
                spans: list[tuple[int, int]]) -> list[int]:
        """Labels equal to ids inside each span, through its last end-of-turn token."""
        if self.train_on_prompt:
            return list(ids)
        labels = [IGNORE_INDEX] * len(ids)
        starts = [start for start, _ in offsets]
        ends = [end for _, end in offsets]
        for start, end in spans:
            # A token that straddles the reply's start (a space of the prompt merged into the
            # reply's first word) trains: every character of the reply is covered.
            first, stop = bisect_right(ends, start), bisect_left(starts, end)
            # Train through the end-of-turn token and not past it (e.g. the newline after it).
            last = next((j + 1 for j in range(stop - 1, first - 1, -1) if ids[j] in self.stop_ids), stop)
            labels[first:last] = ids[first:last]
        return labels

    # --- conversations (sft) ----------------------------------------------------------------------

    def encode(self, conv: Conversation) -> Result:
        """-> (row, status); row is None when the status drops it."""
        return self.encode_conversations([conv])[0]

    def encode_conversations(self, convs: list[Conversation]) -> list[Result]:
        texts = [self.render(c.messages, c.tools) for c in convs]
        spans = [self.target_spans(c, t) for c, t in zip(convs, texts)]
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        results = []
        for conv, ids, offsets, conv_spans in zip(convs, batch["input_ids"], batch["offset_mapping"],
                                                  spans):
            row = EncodedRow(ids, self._labels(ids, offsets, conv_spans))
            results.append(self._cut(conv, row))
        return results

    def _cut(self, conv: Conversation, row: EncodedRow) -> Result:
        if row.n_targets == 0:
            return None, NO_TARGET
        if len(row.input_ids) <= self.cutoff_len:
            return row, KEPT
        if self.cutoff_policy == "drop":
            return None, OVER_LONG
        cut = EncodedRow(row.input_ids[: self.cutoff_len], row.labels[: self.cutoff_len])
        if cut.n_targets:
            return cut, TRUNCATED
        # The first trained token lies beyond cutoff_len: older turns make room for a later one.
        shorter = drop_first_exchange(conv.messages)
        if shorter is None:
            return None, NO_TARGET
        row, status = self.encode(Conversation(shorter, conv.tools))
        return row, TRUNCATED if status == KEPT else status

    # --- prompts with replies (preference, KTO) ---------------------------------------------------

    def encode_replies(self, prompt: list[Message], replies: list[str],
                       tools: list[dict] | None) -> tuple[list[int], list[tuple[list[int], list[int]]], str]:
        """(prompt ids, [(reply ids, reply labels)], status) for replies to one prompt.

        The prompt is rendered once; each reply's ids continue it, and the ids of prompt + reply are
        what the template gives for the whole conversation. cutoff_len bounds prompt + the longest
        reply; truncation cuts every reply to the same budget, dropping older turns of the prompt if
        the replies would otherwise keep no token."""
        head = self.render(prompt, tools, add_generation_prompt=True)
        texts = [self.render(prompt + [{"role": "assistant", "content": r}], tools) for r in replies]
        if not all(t.startswith(head) for t in texts):
            raise self._prefix_error()
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        all_ids, all_offsets = batch["input_ids"], batch["offset_mapping"]
        # Shared prompt tokens: those that end inside the prompt text and agree in every rendering.
        n = 0
        while (n < min(len(ids) for ids in all_ids) and all_offsets[0][n][1] <= len(head)
               and all(ids[n] == all_ids[0][n] for ids in all_ids)):
            n += 1
        prompt_ids = all_ids[0][:n]
        continuations = []
        for ids, offsets, text in zip(all_ids, all_offsets, texts):
            labels = self._labels(ids, offsets, [(len(head), len(text))])
            continuations.append((ids[n:], labels[n:]))
        longest = n + max(len(ids) for ids, _ in continuations)
        if longest <= self.cutoff_len:
            return prompt_ids, continuations, KEPT
        if self.cutoff_policy == "drop":
            return prompt_ids, continuations, OVER_LONG
        budget = self.cutoff_len - n
        cut = [(ids[:budget], labels[:budget]) for ids, labels in continuations]
        if budget > 0 and all(_targets(labels) for _, labels in cut):
            return prompt_ids, cut, TRUNCATED
        shorter = drop_first_exchange(prompt)
        if shorter is None:
            return prompt_ids, cut, NO_TARGET
        prompt_ids, continuations, status = self.encode_replies(shorter, replies, tools)
        return prompt_ids, continuations, TRUNCATED if status == KEPT else status

    def encode_preference(self, example: PreferenceExample) -> Result:
        prompt_ids, ((c_ids, c_labels), (r_ids, r_labels)), status = self.encode_replies(
            example.prompt, [example.chosen, example.rejected], example.tools)
        if status in (OVER_LONG, NO_TARGET):
            return None, status
        return PreferenceRow(prompt_ids, c_ids, c_labels, r_ids, r_labels), status

    def encode_kto(self, example: KTOExample) -> Result:
        prompt_ids, ((ids, labels),), status = self.encode_replies(
            example.prompt, [example.completion], example.tools)
        if status in (OVER_LONG, NO_TARGET):
            return None, status
        return KTORow(prompt_ids, ids, labels, example.desirable), status

    def encode_records(self, records: list[Record]) -> list[Result]:
        """Any chat record kind, in order. Conversations share one tokenizer call per batch."""
        if records and isinstance(records[0], Conversation):
            return self.encode_conversations(records)  # type: ignore[arg-type]
        return [self.encode_preference(r) if isinstance(r, PreferenceExample) else self.encode_kto(r)
                for r in records]  # type: ignore[arg-type]


class TextEncoder:
    """Plain documents (pt): the tokenizer's own special tokens, the text, then EOS.

    With packing, documents are kept whole here and packed into rows of cutoff_len later (a longer
    document continues in the next row); without it, each document is one row under cutoff_policy."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cutoff_len: int, cutoff_policy: str,
                 packing: bool):
        if tokenizer.eos_token_id is None:
            raise ModelError(f"the tokenizer of {tokenizer.name_or_path} has no EOS token to end "
                             "documents with.", "use a tokenizer that defines eos_token.")
        self.tokenizer = tokenizer
        self.cutoff_len = cutoff_len
        self.cutoff_policy = cutoff_policy
        self.packing = packing

    def encode_records(self, records: list[Document]) -> list[Result]:
        eos = self.tokenizer.eos_token_id
        batch = self.tokenizer([d.text for d in records])["input_ids"]
        results: list[Result] = []
        for ids in batch:
            ids = ids + [eos]
            if len(ids) <= self.cutoff_len or (self.packing and self.cutoff_policy == "truncate"):
                results.append((EncodedRow(ids, list(ids)), KEPT))
            elif self.cutoff_policy == "drop":
                results.append((None, OVER_LONG))
            else:
                ids = ids[: self.cutoff_len]
                results.append((EncodedRow(ids, list(ids)), TRUNCATED))
        return results
