"""An Ollama Modelfile that prompts the exported model as lmtune trained it.

Ollama formats chats with a Go template, not the tokenizer's Jinja one. Most chat templates wrap
each message in text that depends only on its role (ChatML, Llama 3, Zephyr...), plus a generation
prompt and perhaps a default system prompt put in when the conversation has none. That text is
found by rendering the tokenizer's own template around marker contents, turned into a Go template
over Ollama's `.Messages`, and kept only if it reproduces the Jinja rendering of several
conversations exactly. The default system prompt becomes SYSTEM: Ollama puts it first when a chat
has no system message, as the Jinja template does. A template that is not of this kind gets no
TEMPLATE line, and Ollama picks one from the GGUF's tokenizer.chat_template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lmtune.config import RunConfig

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class MessageFormat:
    head: str  # before the first message
    wrap: dict[str, tuple[str, str]]  # role -> text before and after its content
    generation: str  # starts the reply
    default_system: str  # put in when a conversation has none ("" for none)

    def render(self, messages: list[dict[str, str]]) -> str:
        """What Ollama renders with the Go template and SYSTEM of `modelfile`."""
        if self.default_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}] + messages
        body = "".join(self.wrap[m["role"]][0] + m["content"] + self.wrap[m["role"]][1]
                       for m in messages)
        return self.head + body + self.generation

    def go_template(self) -> str:
        def branch(role: str) -> str:
            before, after = self.wrap[role]
            return f"{before}{{{{ .Content }}}}{after}"

        generic = {role: tuple(part.replace(role, "\0") for part in self.wrap[role]) for role in ROLES}
        if len(set(generic.values())) == 1 and "\0" in "".join(generic["user"]):
            # The role's name is the only difference (ChatML): one branch writes every role.
            before, after = (p.replace("\0", "{{ .Role }}") for p in generic["user"])
            body = f"{before}{{{{ .Content }}}}{after}"
        else:
            body = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{branch(role)}'
                           for i, role in enumerate(ROLES)) + "{{ end }}"
        return f"{self.head}{{{{ range .Messages }}}}{body}{{{{ end }}}}{self.generation}"


def _strip(text: str, start: str, end: str) -> str | None:
    if text.startswith(start) and text.endswith(end) and len(text) >= len(start) + len(end):
        return text[len(start): len(text) - len(end)]
    return None


def message_format(tokenizer: PreTrainedTokenizerBase) -> MessageFormat | None:
    """The per-role wrapping of the tokenizer's chat template, or None when it has none."""
    def render(messages, generation=False):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation)

    slot = [f"lmtuneslot{i}x" for i in range(4)]
    chat = [{"role": "system", "content": slot[0]}, {"role": "user", "content": slot[1]},
            {"role": "assistant", "content": slot[2]}, {"role": "user", "content": slot[3]}]
    try:
        r1, r2, r3 = render(chat[:2]), render(chat[:3]), render(chat)
        generated, alone = render(chat, True), render(chat[1:2])
    except Exception:  # noqa: BLE001 - a template may refuse any of these shapes on purpose
        return None
    if not (r2.startswith(r1) and r3.startswith(r2) and generated.startswith(r3)):
        return None
    wrap: dict[str, tuple[str, str]] = {}
    for role, block, content in (("assistant", r2[len(r1):], slot[2]), ("user", r3[len(r2):], slot[3])):
        if block.count(content) != 1:
            return None
        before, after = block.split(content)
        wrap[role] = (before, after)
    user_block = wrap["user"][0] + slot[1] + wrap["user"][1]
    system_part, no_system = _strip(r1, "", user_block), _strip(alone, "", user_block)
    if system_part is None or no_system is None or system_part.count(slot[0]) != 1:
        return None
    before, after = system_part.split(slot[0])
    default = _strip(no_system, before, after) if no_system else None
    head = "" if default is not None else no_system
    if not before.startswith(head):
        return None
    wrap["system"] = (before[len(head):], after)
    found = MessageFormat(head, wrap, generated[len(r3):], default or "")
    checks = [chat[1:2], chat[:2], chat, chat[1:] + [{"role": "assistant", "content": "b"},
                                                     {"role": "user", "content": "c"}]]
    try:
        if any(render(m, True) != found.render(m) for m in checks):
            return None
    except Exception:  # noqa: BLE001 - as above
        return None
    return found


def modelfile(tokenizer: PreTrainedTokenizerBase, stop_ids: list[int], source: str,
              cfg: RunConfig) -> tuple[str, bool]:
    """The Modelfile text for the weights at `source` (relative to the Modelfile), and whether it
    holds a TEMPLATE."""
    lines = ["# Ollama Modelfile written by lmtune export. In this folder: "
             "ollama create NAME -f Modelfile", f"FROM {source}"]
    found = message_format(tokenizer)
    template = found.go_template() if found else None
    if found is not None:
        text = "".join(sum(found.wrap.values(), (found.head, found.generation)))
        if '"""' in text + found.default_system or "{{" in text:
            template = None  # text Ollama would read as the end of the block or as an action
    if template is None:
        lines.append("# no TEMPLATE: this chat template is not one block of text per message, so "
                     "Ollama picks one from the model's tokenizer.chat_template")
    else:
        lines.append(f'TEMPLATE """{template}"""')
        if found.default_system:
            lines.append(f'SYSTEM """{found.default_system}"""')
    for token in tokenizer.convert_ids_to_tokens(stop_ids):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    # lmtune chat's sampling, so Ollama answers as `lmtune chat` does.
    if cfg.do_sample:
        lines += [f"PARAMETER temperature {cfg.temperature}", f"PARAMETER top_p {cfg.top_p}",
                  f"PARAMETER top_k {cfg.top_k}"]
    else:
        lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER repeat_penalty {cfg.repetition_penalty}")
    return "\n".join(lines) + "\n", template is not None
