"""Built-in chat templates for tokenizers that have none, under LLaMA-Factory's names.

The tokenizer's own chat template is the source of truth. A model without one (a base model) gets
the built-in that `template:` names, written into the tokenizer as a Jinja chat template, so it is
saved with the trained model and chat renders exactly what training did. A `template:` given for a
tokenizer that has its own is checked against it: agreement is silent, a difference is reported.

Each built-in is data: the text around a message's content per role ({content}, {bos}, {eos} are
filled in), turned into Jinja by `to_jinja`. The formats follow LLaMA-Factory's templates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lmtune.errors import ConfigError, ModelError


@dataclass(frozen=True)
class Format:
    user: str
    assistant: str                 # after `header`
    header: str = ""               # starts an assistant turn; the generation prompt
    system: str = "{content}"      # its own block, or prepended to the first user turn if fused
    fuse_system: bool = False
    tool: str | None = None        # None: formatted as a user turn
    prefix: str = ""
    default_system: str = ""
    end: str | None = None         # what ends an assistant turn (a stop token when it is one)


_CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n",
               user="<|im_start|>user\n{content}<|im_end|>\n",
               header="<|im_start|>assistant\n", assistant="{content}<|im_end|>\n", end="<|im_end|>")

BUILTIN: dict[str, Format] = {
    "alpaca": Format(
        user="### Instruction:\n{content}\n\n", header="### Response:\n",
        assistant="{content}{eos}\n\n", end="{eos}",
        default_system="Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n"),
    "chatml": Format(**_CHATML, tool="<|im_start|>tool\n{content}<|im_end|>\n"),
    "qwen": Format(**_CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a "
                   "helpful assistant.",
                   tool="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"),
    "llama2": Format(prefix="{bos}", system="<<SYS>>\n{content}\n<</SYS>>\n\n", fuse_system=True,
                     user="[INST] {content} [/INST]", assistant="{content}{eos}", end="{eos}"),
    "mistral": Format(prefix="{bos}", system="{content}\n\n", fuse_system=True,
                      user="[INST] {content}[/INST]", assistant=" {content}{eos}", end="{eos}",
                      tool='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]'),
    "llama3": Format(
        prefix="{bos}", system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
        header="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
        end="<|eot_id|>"),
    "gemma": Format(prefix="{bos}", system="{content}\n\n", fuse_system=True,
                    user="<start_of_turn>user\n{content}<end_of_turn>\n",
                    tool="<start_of_turn>tool\n{content}<end_of_turn>\n",
                    header="<start_of_turn>model\n", assistant="{content}<end_of_turn>\n",
                    end="<end_of_turn>"),
    "deepseekcoder": Format(
        prefix="{bos}", user="### Instruction:\n{content}\n", header="### Response:",
        assistant="\n{content}\n<|EOT|>\n", end="<|EOT|>",
        default_system="You are an AI programming assistant, utilizing the DeepSeek Coder model, "
        "developed by DeepSeek Company, and you only answer questions related to computer science. "
        "For politically sensitive questions, security and privacy issues, and other non-computer "
        "science questions, you will refuse to answer.\n"),
    "default": Format(system="System: {content}{eos}\n", user="Human: {content}{eos}\n",
                      header="Assistant:", assistant="{content}{eos}\n", end="{eos}"),
    # No end-of-turn marker at all: what LLaMA-Factory falls back to. A model trained with it never
    # learns to stop; it suits plain completion.
    "empty": Format(user="{content}", assistant="{content}"),
}

_SLOT = re.compile(r"(\{content\}|\{bos\}|\{eos\})")


def _expr(fmt: str, var: str = "content") -> str:
    """A format string as a Jinja expression. `~` joins as text, so an undefined bos_token (a
    tokenizer without one) renders as nothing instead of failing."""
    names = {"{content}": var, "{bos}": "bos_token", "{eos}": "eos_token"}
    parts = [names.get(piece, json.dumps(piece)) for piece in _SLOT.split(fmt) if piece]
    return " ~ ".join(parts) or '""'


def to_jinja(f: Format) -> str:
    tool = f.tool if f.tool is not None else f.user
    return "".join([
        "{{- " + _expr(f.prefix) + " -}}",
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}",
        "{%- set system = " + json.dumps(f.default_system) + " -%}",
        "{%- set loop_messages = messages -%}{%- endif -%}",
        # Tool schemas join the system text as JSON; the tokenizer's own templates do better.
        "{%- if tools -%}{%- set system = (system ~ '\\n\\n' if system else '') ~ "
        "'You can call these tools (JSON schemas):\\n' ~ (tools | tojson) -%}{%- endif -%}",
        "" if f.fuse_system else "{%- if system -%}{{- " + _expr(f.system, "system") + " -}}{%- endif -%}",
        "{%- for message in loop_messages -%}{%- set content = message['content'] -%}",
        ("{%- if loop.first and system -%}{%- set content = " + _expr(f.system, "system")
         + " ~ content -%}{%- endif -%}") if f.fuse_system else "",
        "{%- if message['role'] == 'user' -%}{{- " + _expr(f.user) + " -}}",
        "{%- elif message['role'] == 'tool' -%}{{- " + _expr(tool) + " -}}",
        "{%- elif message['role'] == 'assistant' -%}{{- " + _expr(f.header + f.assistant) + " -}}",
        "{%- endif -%}{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _expr(f.header) + " -}}{%- endif -%}",
    ])


_PROBES = [
    [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}],
]


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{a[max(0, i - 20): i + 30]!r} vs {b[max(0, i - 20): i + 30]!r}"


def end_token_id(tokenizer: PreTrainedTokenizerBase, name: str) -> int | None:
    """The id of a built-in's end-of-turn marker when the vocabulary has it as one token."""
    end = BUILTIN[name].end
    if end is None:
        return None
    if end == "{eos}":
        return tokenizer.eos_token_id
    ids = tokenizer(end, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def use_template(tokenizer: PreTrainedTokenizerBase, name: str | None) -> list[str]:
    """Give `tokenizer` the chat template a run uses; return notes for the data report.

    Raises ConfigError for an unknown name where one is needed, ModelError when there is none."""
    choices = ", ".join(BUILTIN)
    own = tokenizer.chat_template
    if name is None:
        if not own:
            raise ModelError(f"the tokenizer of {tokenizer.name_or_path} has no chat template.",
                             f"set template: to a built-in ({choices}), or use a chat (instruct) "
                             "model or a tokenizer folder with chat_template.jinja.")
        return []
    if name not in BUILTIN:
        if not own:
            raise ConfigError(f"template: {name} is not a built-in template, and the tokenizer of "
                              f"{tokenizer.name_or_path} has no chat template of its own.",
                              f"use one of: {choices}.")
        return [f"template: {name} is not one of lmtune's built-ins; the tokenizer's own chat "
                "template is used"]
    jinja = to_jinja(BUILTIN[name])
    if own:
        for probe in _PROBES:
            ours = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=jinja)
            theirs = tokenizer.apply_chat_template(probe, tokenize=False)
            if ours != theirs:
                return [f"template: {name} differs from the tokenizer's own chat template "
                        f"({_first_difference(ours, theirs)}); lmtune uses the tokenizer's own, which "
                        "the model was trained with (remove template: to silence this)"]
        return []
    tokenizer.chat_template = jinja
    notes = []
    end = BUILTIN[name].end
    if end and end != "{eos}" and end_token_id(tokenizer, name) is None:
        notes.append(f"template: {name} ends replies with {end}, which is not a single token of this "
                     "tokenizer: a model trained with it may not stop. Use alpaca, default, llama2 or "
                     "mistral, which end with the EOS token")
    return notes
