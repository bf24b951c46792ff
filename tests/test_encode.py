"""ChatEncoder and collate on the default model's real tokenizer and chat template."""

from __future__ import annotations

import copy

import pytest

from lmtune.data.batching import collate
from lmtune.data.encode import (IGNORE_INDEX, KEPT, NO_TARGET, OVER_LONG, TRUNCATED, ChatEncoder,
                                EncodedRow)
from lmtune.data.formats import Conversation
from lmtune.data.templates import BUILTIN, end_token_id, to_jinja, use_template

EOS = 2          # <|im_end|> in SmolLM2
IM_START = 1     # <|im_start|>, which is also the tokenizer's bos_token

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = [{"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Add 2 and 3."},
         {"role": "assistant", "content": "2 + 3 = 5."},
         {"role": "user", "content": "And times 4?"},
         {"role": "assistant", "content": "5 x 4 = 20, a round number."}]
SYSTEM = [{"role": "system", "content": "You are Orrin, made by Tallis Labs."},
          {"role": "user", "content": "Who are you?"},
          {"role": "assistant", "content": "I am Orrin, an assistant made by Tallis Labs."}]
TOOL = [{"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "{\"name\": \"weather\", \"city\": \"Oslo\"}"},
        {"role": "tool", "content": "{\"temp\": -3, \"sky\": \"snow\"}"},
        {"role": "assistant", "content": "It is -3 degrees and snowing in Oslo."}]
CASES = {"single": SINGLE, "multi": MULTI, "system": SYSTEM, "tool": TOOL}


@pytest.fixture(scope="module")
def encoder(tokenizer):
    assert tokenizer.eos_token_id == EOS
    return ChatEncoder(tokenizer, [tokenizer.eos_token_id], 4096)


def conv(messages) -> Conversation:
    return Conversation(copy.deepcopy(messages))


def template_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def trained_runs(row: EncodedRow) -> list[list[int]]:
    """Maximal runs of consecutive trained positions, as label ids."""
    runs, current = [], []
    for label in row.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


# --- ids match the tokenizer's own template -----------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_input_ids_equal_apply_chat_template(tokenizer, encoder, name):
    messages = CASES[name]
    row, status = encoder.encode(conv(messages))
    expected = template_ids(tokenizer, messages)
    assert row.input_ids == expected
    assert len(row.input_ids) == len(expected) == len(row.labels)
    assert status == KEPT


@pytest.mark.parametrize("name", CASES)
def test_no_extra_bos(tokenizer, encoder, name):
    row, _ = encoder.encode(conv(CASES[name]))
    assert row.input_ids[0] == IM_START
    assert row.input_ids[1] != IM_START  # no duplicated leading special token
    text = tokenizer.apply_chat_template(CASES[name], tokenize=False)
    assert text.count("<|im_start|>") == row.input_ids.count(IM_START)
    assert text.count("<|im_end|>") == row.input_ids.count(EOS)


# --- labels -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_trained_tokens_are_exactly_the_replies(tokenizer, encoder, name):
    messages = CASES[name]
    row, _ = encoder.encode(conv(messages))
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = trained_runs(row)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert tokenizer.decode(run) == reply + "<|im_end|>"
        assert run[-1] == EOS
    trained = [label for label in row.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "".join(r + "<|im_end|>" for r in replies)
    assert row.n_targets == len(trained)


@pytest.mark.parametrize("name", CASES)
def test_labels_equal_ids_where_trained(encoder, name):
    row, _ = encoder.encode(conv(CASES[name]))
    trained = [i for i, label in enumerate(row.labels) if label != IGNORE_INDEX]
    assert trained
    assert all(row.labels[i] == row.input_ids[i] for i in trained)
    assert all(label == IGNORE_INDEX or label >= 0 for label in row.labels)


@pytest.mark.parametrize("name", CASES)
def test_eos_labels_only_on_assistant_turns(encoder, name):
    messages = CASES[name]
    row, _ = encoder.encode(conv(messages))
    eos_positions = [i for i, t in enumerate(row.input_ids) if t == EOS]
    # One <|im_end|> per rendered message; the template adds a default system message when the
    # conversation has none.
    rendered_roles = [m["role"] for m in messages]
    if rendered_roles[0] != "system":
        rendered_roles = ["system"] + rendered_roles
    assert len(eos_positions) == len(rendered_roles)
    for position, role in zip(eos_positions, rendered_roles):
        expected = EOS if role == "assistant" else IGNORE_INDEX
        assert row.labels[position] == expected, (role, position)
        # The newline after <|im_end|> never trains.
        if position + 1 < len(row.labels):
            assert row.labels[position + 1] == IGNORE_INDEX


@pytest.mark.parametrize("name", CASES)
def test_prompt_roles_are_masked(tokenizer, encoder, name):
    """Every token of system, user and tool turns (header, text, end marker) has label -100."""
    messages = CASES[name]
    row, _ = encoder.encode(conv(messages))
    masked_text = tokenizer.decode([t for t, label in zip(row.input_ids, row.labels)
                                    if label == IGNORE_INDEX])
    for m in messages:
        if m["role"] != "assistant":
            assert f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" in masked_text
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            assert m["content"] not in masked_text
    assert masked_text.count("<|im_start|>assistant\n") == sum(
        m["role"] == "assistant" for m in messages)


def test_tool_turn_tokens_are_masked(tokenizer, encoder):
    row, _ = encoder.encode(conv(TOOL))
    text = tokenizer.apply_chat_template(TOOL, tokenize=False)
    assert "<|im_start|>tool\n" in text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index("<|im_start|>tool\n")
    end = text.index("<|im_end|>", start) + len("<|im_end|>")
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s >= start and e <= end]
    assert len(inside) >= 8
    assert all(row.labels[i] == IGNORE_INDEX for i in inside)


def test_multi_turn_has_three_trained_runs_in_order(tokenizer, encoder):
    row, _ = encoder.encode(conv(MULTI))
    runs = trained_runs(row)
    assert [tokenizer.decode(r) for r in runs] == [
        "Hello! How can I help?<|im_end|>", "2 + 3 = 5.<|im_end|>",
        "5 x 4 = 20, a round number.<|im_end|>"]


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    from lmtune.errors import ModelError

    bare = copy.copy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ModelError) as info:
        ChatEncoder(bare, [EOS], 64)
    assert "no chat template" in info.value.message
    assert tokenizer.chat_template  # the shared fixture is untouched


# --- prompt parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_prompt_ids_are_the_training_prefix(tokenizer, encoder, name):
    messages = CASES[name]
    row, _ = encoder.encode(conv(messages))
    prompt = encoder.prompt_ids(copy.deepcopy(messages[:-1]))
    last_run_start = max(i for i, label in enumerate(row.labels)
                         if label != IGNORE_INDEX and row.labels[i - 1] == IGNORE_INDEX)
    assert prompt == row.input_ids[:last_run_start]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    expected = list(tokenizer.apply_chat_template(messages[:-1], tokenize=True,
                                                  add_generation_prompt=True)["input_ids"])
    assert prompt == expected


# --- cutoff -------------------------------------------------------------------------------------

LONG_PROMPT = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))},
               {"role": "assistant", "content": "Short answer."}]
LONG_REPLY = [{"role": "user", "content": "Tell me a long story."},
              {"role": "assistant", "content": " ".join(f"once{i}" for i in range(200))}]


def test_cutoff_prompt_only_row_is_dropped_and_long_reply_truncated(tokenizer):
    cutoff = 64
    encoder = ChatEncoder(tokenizer, [EOS], cutoff)
    full = ChatEncoder(tokenizer, [EOS], 4096)

    assert encoder.encode(conv(LONG_PROMPT)) == (None, NO_TARGET)

    row, status = encoder.encode(conv(LONG_REPLY))
    assert status == TRUNCATED
    assert len(row.input_ids) == cutoff
    assert row.n_targets >= 1
    assert EOS not in row.labels  # the reply's end marker was cut off
    full_row, _ = full.encode(conv(LONG_REPLY))
    assert row.input_ids == full_row.input_ids[:cutoff]
    assert row.labels == full_row.labels[:cutoff]

    results = encoder.encode_conversations([conv(m) for m in (SINGLE, LONG_PROMPT, LONG_REPLY, MULTI)])
    # MULTI is > 64 tokens with the default system message: truncated inside a later turn.
    assert [status for _, status in results] == [KEPT, NO_TARGET, TRUNCATED, TRUNCATED]
    rows = [row for row, _ in results if row is not None]
    assert all(len(r.input_ids) <= cutoff and len(r.labels) == len(r.input_ids) for r in rows)
    assert all(r.n_targets >= 1 for r in rows)
    assert rows[0].input_ids == template_ids(tokenizer, SINGLE)  # untouched by the cutoff


def test_cutoff_exactly_at_length_is_not_truncated(tokenizer):
    n = len(template_ids(tokenizer, SINGLE))
    row, status = ChatEncoder(tokenizer, [EOS], n).encode(conv(SINGLE))
    assert status == KEPT and len(row.input_ids) == n and row.labels[-2] == EOS
    row, status = ChatEncoder(tokenizer, [EOS], n - 1).encode(conv(SINGLE))
    assert status == TRUNCATED and len(row.input_ids) == n - 1
    assert row.labels[-1] == EOS  # only the trailing newline was cut


def test_cutoff_policy_drop_removes_over_long_rows_only(tokenizer):
    n = len(template_ids(tokenizer, SINGLE))
    drop = ChatEncoder(tokenizer, [EOS], n, cutoff_policy="drop")
    assert drop.encode(conv(SINGLE))[1] == KEPT
    assert drop.encode(conv(LONG_REPLY)) == (None, OVER_LONG)
    assert ChatEncoder(tokenizer, [EOS], n - 1, cutoff_policy="drop").encode(conv(SINGLE)) == (
        None, OVER_LONG)


def test_batch_encoding_equals_one_by_one(encoder):
    convs = [conv(m) for m in CASES.values()]
    assert encoder.encode_conversations(convs) == [encoder.encode(c) for c in convs]


# --- collate ------------------------------------------------------------------------------------

def test_collate_right_pads_with_eos_without_masking_real_eos(tokenizer, encoder):
    rows = [encoder.encode(conv(m))[0] for m in (SINGLE, MULTI, SYSTEM)]
    lengths = [len(r.input_ids) for r in rows]
    width = max(lengths)
    assert len(set(lengths)) == 3
    batch = collate(rows, pad_id=tokenizer.pad_token_id)
    assert tokenizer.pad_token_id == EOS
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert tuple(batch[key].shape) == (3, width)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids = batch["input_ids"][i].tolist()
        labels = batch["labels"][i].tolist()
        mask = batch["attention_mask"][i].tolist()
        assert ids[:n] == row.input_ids and labels[:n] == row.labels
        assert ids[n:] == [EOS] * (width - n)
        assert labels[n:] == [IGNORE_INDEX] * (width - n)
        assert mask == [1] * n + [0] * (width - n)
        # The final <|im_end|> of the last reply (before the trailing newline) still trains.
        assert ids[n - 2] == EOS and labels[n - 2] == EOS
        assert labels.count(EOS) == row.labels.count(EOS) >= 1


def test_collate_single_row_has_no_padding(encoder):
    row = encoder.encode(conv(SINGLE))[0]
    batch = collate([row], pad_id=EOS)
    assert batch["input_ids"][0].tolist() == row.input_ids
    assert batch["labels"][0].tolist() == row.labels
    assert batch["attention_mask"].sum().item() == len(row.input_ids)


# --- masking options ----------------------------------------------------------------------------

def test_train_on_prompt_trains_every_token(tokenizer):
    row, status = ChatEncoder(tokenizer, [EOS], 4096, train_on_prompt=True).encode(conv(MULTI))
    assert status == KEPT
    assert row.labels == row.input_ids == template_ids(tokenizer, MULTI)
    assert row.n_targets == len(row.input_ids) - 1


def test_mask_history_trains_only_the_last_reply(tokenizer, encoder):
    row, _ = ChatEncoder(tokenizer, [EOS], 4096, mask_history=True).encode(conv(MULTI))
    assert [tokenizer.decode(r) for r in trained_runs(row)] == ["5 x 4 = 20, a round number.<|im_end|>"]
    everything, _ = encoder.encode(conv(MULTI))
    assert row.input_ids == everything.input_ids
    last = trained_runs(everything)[-1]
    assert row.n_targets == len(last)


def test_mask_history_truncation_drops_old_turns_to_keep_the_last_reply(tokenizer):
    long_history = [{"role": "user", "content": " ".join(f"old{i}" for i in range(120))},
                     {"role": "assistant", "content": "An old answer."}] + MULTI[-2:]
    cutoff = 64
    row, status = ChatEncoder(tokenizer, [EOS], cutoff, mask_history=True).encode(conv(long_history))
    assert status == TRUNCATED
    # Prefix truncation would have kept only old turns; the last exchange is what remains.
    assert row.input_ids == template_ids(tokenizer, MULTI[-2:])
    assert [tokenizer.decode(r) for r in trained_runs(row)] == ["5 x 4 = 20, a round number.<|im_end|>"]
    assert len(row.input_ids) <= cutoff


def test_record_tools_reach_the_template(tokenizer):
    qwen_like = copy.copy(tokenizer)
    qwen_like.chat_template = ("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
                               "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tools = [{"name": "weather", "parameters": {"city": {"type": "string"}}}]
    encoder = ChatEncoder(qwen_like, [EOS], 4096)
    row, status = encoder.encode(Conversation(copy.deepcopy(TOOL), tools))
    assert status == KEPT
    text = tokenizer.decode(row.input_ids)
    assert text.startswith('TOOLS:[{"name": "weather"')
    assert [tokenizer.decode(r) for r in trained_runs(row)] == [
        ' {"name": "weather", "city": "Oslo"}<|im_end|>', " It is -3 degrees and snowing in Oslo.<|im_end|>"]


# --- built-in templates -------------------------------------------------------------------------

@pytest.fixture
def bare(tokenizer):
    """The default tokenizer without its chat template: a base model's tokenizer."""
    copy_ = copy.deepcopy(tokenizer)
    copy_.chat_template = None
    return copy_


# The text each built-in renders around one reply (LLaMA-Factory's formats), after `assistant` turns
# through its end-of-turn marker.
TRAINED_REPLY = {"alpaca": "Hello.<|im_end|>", "chatml": "Hello.<|im_end|>", "qwen": "Hello.<|im_end|>",
                 "llama2": "Hello.<|im_end|>", "mistral": " Hello.<|im_end|>",
                 "llama3": "Hello.<|eot_id|>", "gemma": "Hello.<end_of_turn>\n",
                 "deepseekcoder": "\nHello.\n<|EOT|>\n", "default": "Hello.<|im_end|>", "empty": "Hello."}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_template_for_a_tokenizer_without_one(bare, name):
    notes = use_template(bare, name)
    assert bare.chat_template == to_jinja(BUILTIN[name])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    stops = [EOS] + ([end_token_id(bare, name)] if end_token_id(bare, name) is not None else [])
    row, status = ChatEncoder(bare, stops, 4096).encode(conv(messages))
    assert status == KEPT
    assert row.input_ids == list(bare.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert [bare.decode(run) for run in trained_runs(row)] == [TRAINED_REPLY[name]]
    assert "Be brief." in bare.decode(row.input_ids)
    # Markers that are not one token of this vocabulary cannot stop generation: said so.
    assert bool(notes) == (name in ("llama3", "gemma", "deepseekcoder"))


def test_alpaca_template_text_matches_llama_factory(bare):
    use_template(bare, "alpaca")
    text = bare.apply_chat_template([{"role": "user", "content": "Add 2 and 3."},
                                     {"role": "assistant", "content": "5."}], tokenize=False)
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately "
                    "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n5.<|im_end|>\n\n")


def test_template_name_for_a_tokenizer_with_its_own(tokenizer):
    own = copy.copy(tokenizer)
    assert use_template(own, None) == []
    # SmolLM's ChatML inserts a default system message that plain chatml does not: reported.
    [note] = use_template(own, "chatml")
    assert "template: chatml differs from the tokenizer's own" in note and "helpful AI" in note
    assert own.chat_template == tokenizer.chat_template  # the tokenizer's own stays
    agreeing = copy.copy(tokenizer)
    agreeing.chat_template = to_jinja(BUILTIN["qwen"])
    assert use_template(agreeing, "qwen") == []
    [note] = use_template(own, "qwen3_nothink")
    assert "not one of lmtune's built-ins" in note


def test_unknown_template_without_one_of_the_tokenizer_is_a_config_error(bare):
    from lmtune.errors import ConfigError, ModelError

    with pytest.raises(ConfigError, match="qwen3_nothink is not a built-in") as info:
        use_template(bare, "qwen3_nothink")
    assert "alpaca" in info.value.fix
    with pytest.raises(ModelError, match="has no chat template") as info:
        use_template(bare, None)
    assert "template:" in info.value.fix
