"""Dataset records (alpaca, sharegpt, openai; SFT, preference, KTO, plain text) -> canonical records.

Four canonical kinds, one per kind of training signal:
- `Conversation`: messages with roles system, user, assistant and tool, in the order a chat template
  expects (an optional system message, then user or tool and assistant turns alternating, ending
  with an assistant reply). Every reply is a target; everything else is prompt. (sft, ppo)
- `PreferenceExample`: a prompt (the same messages, ending with a user or tool turn) and two
  replies to it, chosen and rejected. (rm, dpo)
- `KTOExample`: a prompt and one reply with a desirable / undesirable tag. (kto)
- `Document`: plain text. (pt)

Parsers raise `RecordError` with the reason; the loader adds the file and record index.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

Message = dict[str, str]
Kind = Literal["conversation", "preference", "kto", "text"]

# Which canonical kind each training stage consumes. sft and ppo read conversations (ppo uses the
# prompt part); rm and dpo read preference pairs, as LLaMA-Factory's `ranking: true` data.
STAGE_KINDS: dict[str, Kind] = {"sft": "conversation", "ppo": "conversation", "rm": "preference",
                                "dpo": "preference", "kto": "kto", "pt": "text"}


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict] | None = None


@dataclass
class PreferenceExample:
    prompt: list[Message]
    chosen: str
    rejected: str
    tools: list[dict] | None = None


@dataclass
class KTOExample:
    prompt: list[Message]
    completion: str
    desirable: bool
    tools: list[dict] | None = None


@dataclass
class Document:
    text: str


Record = Conversation | PreferenceExample | KTOExample | Document


@dataclass
class DatasetAttr:
    """One dataset_info.json entry (LLaMA-Factory schema), with its defaults filled in."""

    name: str
    file_name: str = ""
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    hf_hub_url: str | None = None
    subset: str | None = None
    split: str = "train"
    num_samples: int | None = None
    info_file: str | None = None  # the dataset_info.json that registers it, for messages

    def column(self, key: str) -> str:
        defaults = {"prompt": "instruction", "query": "input", "response": "output",
                    "history": "history", "system": "system", "tools": "tools",
                    "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag",
                    "messages": "conversations" if self.formatting == "sharegpt" else "messages"}
        return self.columns.get(key, defaults.get(key, key))

    def tag(self, key: str) -> str:
        sharegpt = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                    "assistant_tag": "gpt", "observation_tag": "observation",
                    "function_tag": "function_call", "system_tag": "system"}
        openai = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                  "assistant_tag": "assistant", "observation_tag": "tool",
                  "function_tag": "function_call", "system_tag": "system"}
        defaults = openai if self.formatting == "openai" else sharegpt
        return self.tags.get(key, defaults[key])


class RecordError(ValueError):
    """A record that does not fit its format; the loader adds the file and index."""


def _text(record: dict[str, Any], column: str, required: bool = False) -> str:
    value = record.get(column)
    if value is None:
        if required:
            raise RecordError(f"missing field '{column}'")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{column}' must be text, got {type(value).__name__}")
    return value


def _tools(record: dict[str, Any], attr: DatasetAttr) -> list[dict] | None:
    """Tool schemas: a JSON list of objects, or its text (LLaMA-Factory stores it as text)."""
    column = attr.column("tools")
    value = record.get(column)
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise RecordError(f"field '{column}' is text but not JSON; it must list tool schemas") from None
    if isinstance(value, dict):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(tool, dict) for tool in value)):
        raise RecordError(f"field '{column}' must be a list of tool schemas (JSON objects)")
    return value or None


# --- alpaca ---------------------------------------------------------------------------------------

def _alpaca_prompt(record: dict[str, Any], attr: DatasetAttr) -> list[Message]:
    """system, history pairs, then the instruction (+ input) as the last user turn."""
    instruction = _text(record, attr.column("prompt"))
    query = _text(record, attr.column("query"))
    user = "\n".join(part for part in (instruction, query) if part)
    if not user:
        raise RecordError(f"empty prompt: '{attr.column('prompt')}' and "
                          f"'{attr.column('query')}' are both empty")
    messages: list[Message] = []
    system = _text(record, attr.column("system"))
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get(attr.column("history")) or []
    if not isinstance(history, list):
        raise RecordError(f"field '{attr.column('history')}' must be a list of [question, answer] pairs")
    for turn, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"history turn {turn} must be a [question, answer] pair of texts")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": user})
    return messages


def parse_alpaca(record: dict[str, Any], attr: DatasetAttr) -> Conversation:
    messages = _alpaca_prompt(record, attr)
    response = _text(record, attr.column("response"), required=True)
    return Conversation(messages + [{"role": "assistant", "content": response}], _tools(record, attr))


# --- sharegpt / openai ----------------------------------------------------------------------------

def _roles(attr: DatasetAttr) -> dict[str, str]:
    return {attr.tag("user_tag"): "user", attr.tag("assistant_tag"): "assistant",
            attr.tag("observation_tag"): "tool", attr.tag("function_tag"): "assistant",
            attr.tag("system_tag"): "system"}


def _message(turn: Any, i: int | str, attr: DatasetAttr) -> Message:
    role_tag, content_tag = attr.tag("role_tag"), attr.tag("content_tag")
    roles = _roles(attr)
    if not isinstance(turn, dict):
        raise RecordError(f"message {i} must be an object with '{role_tag}' and '{content_tag}'")
    tag = turn.get(role_tag)
    if not isinstance(tag, str) or tag not in roles:  # a list or object here is unhashable
        raise RecordError(f"message {i} has {role_tag}={tag!r}; expected one of {sorted(roles)}")
    content = turn.get(content_tag)
    if not isinstance(content, str):
        raise RecordError(f"message {i} needs text in '{content_tag}'")
    return {"role": roles[tag], "content": content}


def _sharegpt_messages(record: dict[str, Any], attr: DatasetAttr) -> list[Message]:
    column = attr.column("messages")
    turns = record.get(column)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field '{column}' must be a non-empty list of messages")
    messages: list[Message] = []
    system = _text(record, attr.column("system"))
    for i, turn in enumerate(turns):
        message = _message(turn, i, attr)
        if message["role"] == "system":
            if i != 0:
                raise RecordError(f"message {i} is a system message; only the first may be")
            system = message["content"]  # a leading system message overrides the system column
            continue
        messages.append(message)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def parse_sharegpt(record: dict[str, Any], attr: DatasetAttr) -> Conversation:
    """sharegpt (from/value) and openai (role/content) records; the tags say which."""
    return Conversation(_sharegpt_messages(record, attr), _tools(record, attr))


PARSERS: dict[str, Callable[[dict[str, Any], DatasetAttr], Conversation]] = {
    "alpaca": parse_alpaca, "sharegpt": parse_sharegpt, "openai": parse_sharegpt}


# --- preference, KTO, text ------------------------------------------------------------------------

def _reply(record: dict[str, Any], key: str, attr: DatasetAttr) -> str:
    """A chosen/rejected reply: text (alpaca shape) or one assistant message (sharegpt shape)."""
    column = attr.column(key)
    value = record.get(column)
    if value is None:
        raise RecordError(f"missing field '{column}'")
    if isinstance(value, str):
        return value
    if attr.formatting == "alpaca":
        raise RecordError(f"field '{column}' must be text, got {type(value).__name__}")
    message = _message(value, column, attr)
    if message["role"] != "assistant":
        raise RecordError(f"'{column}' must be an assistant message, got role '{message['role']}'")
    return message["content"]


def parse_preference(record: dict[str, Any], attr: DatasetAttr) -> PreferenceExample:
    if attr.formatting == "alpaca":
        prompt = _alpaca_prompt(record, attr)
    else:
        prompt = _sharegpt_messages(record, attr)
    return PreferenceExample(prompt, _reply(record, "chosen", attr), _reply(record, "rejected", attr),
                             _tools(record, attr))


def parse_kto(record: dict[str, Any], attr: DatasetAttr) -> KTOExample:
    conv = PARSERS[attr.formatting](record, attr)
    column = attr.column("kto_tag")
    tag = record.get(column)
    if not isinstance(tag, bool):
        raise RecordError(f"field '{column}' (kto_tag) must be true or false, got "
                          f"{'nothing' if tag is None else repr(tag)}")
    if not conv.messages or conv.messages[-1]["role"] != "assistant":
        raise RecordError("a KTO record must end with the assistant reply it rates")
    return KTOExample(conv.messages[:-1], conv.messages[-1]["content"], tag, conv.tools)


def parse_text(record: dict[str, Any], attr: DatasetAttr) -> Document:
    # Pre-training text sits in `columns.prompt` as LLaMA-Factory registers it ({"prompt": "text"});
    # a file named by path or an entry without columns holds it in "text".
    column = attr.columns.get("prompt", "text")
    text = _text(record, column, required=True)
    if not text.strip():
        raise RecordError(f"field '{column}' is empty")
    return Document(text)


def parse_record(record: Any, attr: DatasetAttr, kind: Kind) -> Record:
    if not isinstance(record, dict):
        raise RecordError(f"expected an object, got {type(record).__name__}")
    if kind == "preference":
        example = parse_preference(record, attr)
        check_turn_order(example.prompt, ends_with_reply=False)
        for name, reply in (("chosen", example.chosen), ("rejected", example.rejected)):
            if not reply.strip():
                raise RecordError(f"the {name} reply is empty")
        return example
    if kind == "kto":
        example = parse_kto(record, attr)
        check_turn_order(example.prompt, ends_with_reply=False)
        if not example.completion.strip():
            raise RecordError("the rated reply is empty")
        return example
    if kind == "text":
        return parse_text(record, attr)
    conv = PARSERS[attr.formatting](record, attr)
    check_turn_order(conv.messages, ends_with_reply=True)
    return conv


def check_turn_order(messages: list[Message], ends_with_reply: bool) -> None:
    """User/tool and assistant turns alternate after an optional system message. A conversation ends
    with a reply to train on; a prompt (preference, KTO) ends with the turn the replies answer."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError("no user or assistant messages")
    for i, message in enumerate(body):
        expected = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            raise RecordError(f"turn {i} is '{message['role']}' where {' or '.join(expected)} was "
                              "expected: turns must alternate user -> assistant")
    if ends_with_reply and body[-1]["role"] != "assistant":
        raise RecordError("the conversation ends without an assistant reply to train on")
    if not ends_with_reply and body[-1]["role"] == "assistant":
        raise RecordError("the prompt ends with an assistant turn; it must end with the user (or "
                          "tool) turn that the replies answer")
    for i, message in enumerate(body):
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(f"turn {i} is an empty assistant reply")


# --- data_vars ------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def fill_placeholders(record: Record, values: dict[str, str]) -> set[str]:
    """Replace {{key}} with values[key] in every text; return the keys left without a value."""
    missing: set[str] = set()

    def sub(text: str) -> str:
        def one(match: re.Match[str]) -> str:
            key = match.group(1)
            if key in values:
                return values[key]
            missing.add(key)
            return match.group(0)
        return _PLACEHOLDER.sub(one, text) if "{{" in text else text

    if isinstance(record, Document):
        record.text = sub(record.text)
        return missing
    messages = record.messages if isinstance(record, Conversation) else record.prompt
    for message in messages:
        message["content"] = sub(message["content"])
    if isinstance(record, PreferenceExample):
        record.chosen, record.rejected = sub(record.chosen), sub(record.rejected)
    elif isinstance(record, KTOExample):
        record.completion = sub(record.completion)
    if record.tools:
        record.tools = _fill_json(record.tools, sub)
    return missing


def _fill_json(value: Any, sub: Callable[[str], str]) -> Any:
    """Placeholders in every text inside tool schemas (keys and values)."""
    if isinstance(value, str):
        return sub(value)
    if isinstance(value, list):
        return [_fill_json(v, sub) for v in value]
    if isinstance(value, dict):
        return {sub(k): _fill_json(v, sub) for k, v in value.items()}
    return value


def guess_formatting(record: Any) -> tuple[str, bool]:
    """(formatting, ranking) of a file named by path (no dataset_info entry), from its first record."""
    if isinstance(record, dict):
        ranking = "chosen" in record and "rejected" in record
        if isinstance(record.get("messages"), list):
            return "openai", ranking
        if isinstance(record.get("conversations"), list):
            return "sharegpt", ranking
        if "instruction" in record or "output" in record or ranking:
            return "alpaca", ranking
        if isinstance(record.get("text"), str):
            return "alpaca", False  # plain text for pt; read from the "text" field
    raise RecordError("cannot tell the format: expected alpaca (instruction/input/output), "
                      "sharegpt (conversations), openai (messages), preference (chosen/rejected) "
                      "or plain text (text) fields")
