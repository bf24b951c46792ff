"""Dataset records (alpaca, sharegpt, openai) -> canonical conversations.

A canonical conversation is a list of `{"role", "content"}` messages with roles system, user,
assistant and tool, in the order a chat template expects: an optional system message, then user (or
tool) and assistant turns alternating, ending with an assistant reply. Every reply is a training
target; everything else is prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lmtune.errors import DataError

Message = dict[str, str]


@dataclass
class Conversation:
    messages: list[Message]
    tools: str | None = None


@dataclass
class DatasetAttr:
    """One dataset_info.json entry (LLaMA-Factory schema), with its defaults filled in."""

    name: str
    file_name: str
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def column(self, key: str) -> str:
        defaults = {"prompt": "instruction", "query": "input", "response": "output",
                    "history": "history", "system": "system", "tools": "tools",
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


def _tools(record: dict[str, Any], attr: DatasetAttr) -> str | None:
    value = record.get(attr.column("tools"))
    if value in (None, "", []):
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_alpaca(record: dict[str, Any], attr: DatasetAttr) -> Conversation:
    instruction = _text(record, attr.column("prompt"))
    query = _text(record, attr.column("query"))
    user = "\n".join(part for part in (instruction, query) if part)
    if not user:
        raise RecordError(f"empty prompt: '{attr.column('prompt')}' and "
                          f"'{attr.column('query')}' are both empty")
    response = _text(record, attr.column("response"), required=True)
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
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return Conversation(messages, _tools(record, attr))


def parse_sharegpt(record: dict[str, Any], attr: DatasetAttr) -> Conversation:
    """sharegpt (from/value) and openai (role/content) records; the tags say which."""
    column = attr.column("messages")
    turns = record.get(column)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field '{column}' must be a non-empty list of messages")
    role_tag, content_tag = attr.tag("role_tag"), attr.tag("content_tag")
    roles = {attr.tag("user_tag"): "user", attr.tag("assistant_tag"): "assistant",
             attr.tag("observation_tag"): "tool", attr.tag("function_tag"): "assistant",
             attr.tag("system_tag"): "system"}
    messages: list[Message] = []
    system = _text(record, attr.column("system"))
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"message {i} must be an object with '{role_tag}' and '{content_tag}'")
        tag = turn.get(role_tag)
        if not isinstance(tag, str) or tag not in roles:  # a list or object here is unhashable
            raise RecordError(f"message {i} has {role_tag}={tag!r}; expected one of {sorted(roles)}")
        content = turn.get(content_tag)
        if not isinstance(content, str):
            raise RecordError(f"message {i} needs text in '{content_tag}'")
        if roles[tag] == "system":
            if i != 0:
                raise RecordError(f"message {i} is a system message; only the first may be")
            system = content  # a leading system message overrides the system column
            continue
        messages.append({"role": roles[tag], "content": content})
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(messages, _tools(record, attr))


PARSERS = {"alpaca": parse_alpaca, "sharegpt": parse_sharegpt, "openai": parse_sharegpt}


def check_turn_order(conv: Conversation) -> None:
    """User/tool and assistant turns alternate after an optional system message; the last is a reply."""
    body = conv.messages[1:] if conv.messages and conv.messages[0]["role"] == "system" else conv.messages
    if not body:
        raise RecordError("no user or assistant messages")
    for i, message in enumerate(body):
        expected = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            raise RecordError(f"turn {i} is '{message['role']}' where {' or '.join(expected)} was "
                              "expected: turns must alternate user -> assistant")
    if body[-1]["role"] != "assistant":
        raise RecordError("the conversation ends without an assistant reply to train on")
    for i, message in enumerate(body):
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(f"turn {i} is an empty assistant reply")


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def fill_placeholders(conv: Conversation, values: dict[str, str]) -> set[str]:
    """Replace {{key}} with values[key] in every text; return the keys left without a value."""
    missing: set[str] = set()

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key in values:
            return values[key]
        missing.add(key)
        return match.group(0)

    for message in conv.messages:
        message["content"] = _PLACEHOLDER.sub(sub, message["content"])
    if conv.tools:
        conv.tools = _PLACEHOLDER.sub(sub, conv.tools)
    return missing


def guess_formatting(record: Any) -> str:
    """Format of a file named by path (no dataset_info entry), from its first record."""
    if isinstance(record, dict):
        if isinstance(record.get("messages"), list):
            return "openai"
        if isinstance(record.get("conversations"), list):
            return "sharegpt"
        if "instruction" in record or "output" in record:
            return "alpaca"
    raise RecordError("cannot tell the format: expected alpaca (instruction/input/output), "
                      "sharegpt (conversations) or openai (messages) fields")
