"""ChatEncoder and collate on the default model's real tokenizer and chat template."""

from __future__ import annotations

import copy

import pytest

from lmtune.data.batching import collate
from lmtune.data.encode import IGNORE_INDEX, ChatEncoder, EncodedRow
from lmtune.data.formats import Conversation
from lmtune.data.report import EncodeCounts

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
    row, truncated = encoder.encode(conv(messages))
    expected = template_ids(tokenizer, messages)
    assert row.input_ids == expected
    assert len(row.input_ids) == len(expected) == len(row.labels)
    assert truncated is False


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

    row, truncated = encoder.encode(conv(LONG_PROMPT))
    assert truncated is True
    assert len(row.input_ids) == len(row.labels) == cutoff
    assert row.n_targets == 0

    row, truncated = encoder.encode(conv(LONG_REPLY))
    assert truncated is True
    assert len(row.input_ids) == cutoff
    assert row.n_targets >= 1
    assert EOS not in row.labels  # the reply's end marker was cut off
    full_row, _ = full.encode(conv(LONG_REPLY))
    assert row.input_ids == full_row.input_ids[:cutoff]
    assert row.labels == full_row.labels[:cutoff]

    counts = EncodeCounts()
    convs = [conv(SINGLE), conv(LONG_PROMPT), conv(LONG_REPLY), conv(MULTI)]
    rows = encoder.encode_all(convs, counts)
    assert counts.dropped_no_target == 1
    assert counts.truncated == 2  # LONG_REPLY and MULTI (> 64 tokens with the default system)
    assert counts.rows == len(rows) == 3
    assert all(len(r.input_ids) <= cutoff and len(r.labels) == len(r.input_ids) for r in rows)
    assert all(r.n_targets >= 1 for r in rows)
    assert counts.tokens == sum(len(r.input_ids) for r in rows)
    assert counts.target_tokens == sum(r.n_targets for r in rows)
    assert rows[0].input_ids == template_ids(tokenizer, SINGLE)  # untouched by the cutoff


def test_cutoff_exactly_at_length_is_not_truncated(tokenizer):
    n = len(template_ids(tokenizer, SINGLE))
    row, truncated = ChatEncoder(tokenizer, [EOS], n).encode(conv(SINGLE))
    assert truncated is False and len(row.input_ids) == n and row.labels[-2] == EOS
    row, truncated = ChatEncoder(tokenizer, [EOS], n - 1).encode(conv(SINGLE))
    assert truncated is True and len(row.input_ids) == n - 1
    assert row.labels[-1] == EOS  # only the trailing newline was cut


def test_encode_all_counts_with_no_cutoff(tokenizer, encoder):
    counts = EncodeCounts()
    rows = encoder.encode_all([conv(m) for m in CASES.values()], counts)
    assert counts.rows == 4 and counts.truncated == 0 and counts.dropped_no_target == 0
    assert counts.tokens == sum(len(template_ids(tokenizer, m)) for m in CASES.values())
    assert [r.input_ids for r in rows] == [template_ids(tokenizer, m) for m in CASES.values()]


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
