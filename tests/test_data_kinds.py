"""Preference pairs, KTO examples and plain text: parsed into canonical records and encoded.

The rm / dpo / kto / pt objectives live in their stages; this checks the data they consume. Stages
other than sft are set with model_copy, as the stage modules register them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lmtune.config import build_config
from lmtune.data.encode import (IGNORE_INDEX, KEPT, NO_TARGET, OVER_LONG, TRUNCATED, ChatEncoder,
                                EncodedRow, KTORow, PreferenceRow, TextEncoder)
from lmtune.data.formats import Document, KTOExample, PreferenceExample
from lmtune.data.pipeline import prepare_data
from lmtune.data.sources import load_records
from lmtune.errors import DataError
from tests.conftest import write_json

EOS = 2


def config(tmp_path: Path, dataset: str, stage: str = "sft", info: dict | None = None, **values):
    if info is not None:
        write_json(tmp_path / "dataset_info.json", info)
    cfg = build_config({"dataset": dataset, "dataset_dir": str(tmp_path), **values})
    return cfg.model_copy(update={"stage": stage})


def records(tmp_path, dataset, stage, info=None, **values):
    per_dataset, report = load_records(config(tmp_path, dataset, stage, info, **values))
    return [r for rs in per_dataset for r in rs], report


def template_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def trained(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


@pytest.fixture
def encoder(tokenizer):
    return ChatEncoder(tokenizer, [EOS], 4096)


# --- preference ---------------------------------------------------------------------------------

ALPACA_PREF = [{"instruction": "Pick a colour.", "input": "warm ones", "system": "Be brief.",
                "history": [["Hi", "Hello."]], "chosen": "Red.", "rejected": "I refuse."}]
SHAREGPT_PREF = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                    {"from": "human", "value": "Pick a colour."}],
                  "chosen": {"from": "gpt", "value": "Red."},
                  "rejected": {"from": "gpt", "value": "I refuse."}}]


def test_preference_alpaca_and_sharegpt_shapes(tmp_path):
    write_json(tmp_path / "a.json", ALPACA_PREF)
    write_json(tmp_path / "s.json", SHAREGPT_PREF)
    info = {"a": {"file_name": "a.json", "ranking": True},
            "s": {"file_name": "s.json", "formatting": "sharegpt", "ranking": True}}
    (a, s), report = records(tmp_path, "a,s", "dpo", info)
    assert a == PreferenceExample(
        prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Pick a colour.\nwarm ones"}],
        chosen="Red.", rejected="I refuse.")
    assert s.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Pick a colour."}]
    assert (s.chosen, s.rejected) == ("Red.", "I refuse.")
    assert [(d.found, d.kept) for d in report.datasets] == [(1, 1), (1, 1)]


def test_preference_file_by_path_is_recognised_for_dpo(tmp_path):
    path = write_json(tmp_path / "p.json", ALPACA_PREF)
    [example], _ = records(tmp_path, str(path), "rm")
    assert isinstance(example, PreferenceExample) and example.chosen == "Red."


def test_dpo_refuses_data_that_is_not_preference(tmp_path):
    write_json(tmp_path / "sft.json", [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError) as info:
        records(tmp_path, "sft", "dpo", {"sft": {"file_name": "sft.json"}})
    assert "entry 'sft' is not preference data" in info.value.message
    assert "stage dpo" in info.value.message and '"ranking": true' in info.value.fix


@pytest.mark.parametrize("bad, words", [
    ({"instruction": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"instruction": "q", "chosen": "a", "rejected": "  "}, "the rejected reply is empty"),
    ({"instruction": "q", "chosen": 5, "rejected": "b"}, "field 'chosen' must be text"),
])
def test_bad_alpaca_preference_records(tmp_path, bad, words):
    path = write_json(tmp_path / "p.json", ALPACA_PREF + [bad])
    with pytest.raises(DataError) as info:
        records(tmp_path, "p", "dpo", {"p": {"file_name": "p.json", "ranking": True}})
    assert info.value.message.startswith(f"{path}, record 1: {words}")


@pytest.mark.parametrize("change, words", [
    ({"chosen": {"from": "human", "value": "x"}}, "'chosen' must be an assistant message"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "the prompt ends with an assistant turn"),
])
def test_bad_sharegpt_preference_records(tmp_path, change, words):
    path = write_json(tmp_path / "s.json", SHAREGPT_PREF + [SHAREGPT_PREF[0] | change])
    with pytest.raises(DataError) as info:
        records(tmp_path, "s", "dpo", {"s": {"file_name": "s.json", "formatting": "sharegpt",
                                             "ranking": True}})
    assert info.value.message.startswith(f"{path}, record 1: {words}")


def test_preference_encoding_shares_the_prompt(tokenizer, encoder):
    prompt = [{"role": "user", "content": "Pick a colour."}]
    example = PreferenceExample(copy.deepcopy(prompt), "Red, like a ripe tomato.", "No.")
    row, status = encoder.encode_preference(example)
    assert status == KEPT and isinstance(row, PreferenceRow)
    assert row.prompt_ids == encoder.prompt_ids(prompt)  # what chat feeds the model
    for reply, full in ((example.chosen, row.chosen_row()), (example.rejected, row.rejected_row())):
        assert full.input_ids == template_ids(tokenizer, prompt + [{"role": "assistant", "content": reply}])
        assert trained(tokenizer, full.input_ids, full.labels) == reply + "<|im_end|>"
    assert row.n_targets == row.chosen_row().n_targets + row.rejected_row().n_targets
    assert row.length == len(row.chosen_row().input_ids)


def test_preference_cutoff_cuts_both_replies_to_one_budget(tokenizer):
    prompt = [{"role": "user", "content": "Tell a story."}]
    long, short = " ".join(f"once{i}" for i in range(100)), "No story today."
    n_prompt = len(ChatEncoder(tokenizer, [EOS], 4096).prompt_ids(prompt))
    cutoff = n_prompt + 10
    row, status = ChatEncoder(tokenizer, [EOS], cutoff).encode_preference(
        PreferenceExample(prompt, long, short))
    assert status == TRUNCATED
    assert len(row.chosen_ids) == 10 and len(row.rejected_ids) <= 10
    assert row.length == cutoff
    assert all(r.n_targets >= 1 for r in (row.chosen_row(), row.rejected_row()))
    drop = ChatEncoder(tokenizer, [EOS], cutoff, cutoff_policy="drop")
    assert drop.encode_preference(PreferenceExample(prompt, long, short)) == (None, OVER_LONG)
    tiny = ChatEncoder(tokenizer, [EOS], n_prompt)  # no room for any reply token
    assert tiny.encode_preference(PreferenceExample(prompt, long, short)) == (None, NO_TARGET)


def test_preference_cutoff_drops_old_turns_of_the_prompt(tokenizer):
    old = [{"role": "user", "content": " ".join(f"w{i}" for i in range(150))},
           {"role": "assistant", "content": "ok"}]
    last = [{"role": "user", "content": "Pick a colour."}]
    row, status = ChatEncoder(tokenizer, [EOS], 64).encode_preference(
        PreferenceExample(old + last, "Red.", "No."))
    assert status == TRUNCATED
    assert row.chosen_row().input_ids == template_ids(tokenizer, last + [{"role": "assistant",
                                                                          "content": "Red."}])


# --- KTO ----------------------------------------------------------------------------------------

KTO = [{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        "label": True},
       {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Go away."}],
        "label": False}]
KTO_INFO = {"kto": {"file_name": "kto.json", "formatting": "openai", "columns": {"kto_tag": "label"}}}


def test_kto_records_and_rows(tmp_path, tokenizer, encoder):
    write_json(tmp_path / "kto.json", KTO)
    (good, bad), _ = records(tmp_path, "kto", "kto", KTO_INFO)
    assert good == KTOExample([{"role": "user", "content": "Say hi."}], "Hi!", True)
    assert (bad.completion, bad.desirable) == ("Go away.", False)
    row, status = encoder.encode_kto(bad)
    assert status == KEPT and isinstance(row, KTORow) and row.desirable is False
    full = row.row()
    assert full.input_ids == template_ids(tokenizer, KTO[1]["messages"])
    assert trained(tokenizer, full.input_ids, full.labels) == "Go away.<|im_end|>"


@pytest.mark.parametrize("label, words", [("yes", "must be true or false, got 'yes'"),
                                          (None, "must be true or false, got nothing")])
def test_kto_tag_must_be_a_boolean(tmp_path, label, words):
    bad = copy.deepcopy(KTO[0])
    bad["label"] = label
    path = write_json(tmp_path / "kto.json", [KTO[0], bad])
    with pytest.raises(DataError) as info:
        records(tmp_path, "kto", "kto", KTO_INFO)
    assert info.value.message.startswith(f"{path}, record 1: field 'label' (kto_tag) {words}")


# --- plain text (pt) ----------------------------------------------------------------------------

def test_text_from_txt_jsonl_and_columns(tmp_path):
    (tmp_path / "wiki.txt").write_text("First document.\n\n  \nSecond one.\n")
    (tmp_path / "c4.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in ("A.", "B.")))
    info = {"c4": {"file_name": "c4.jsonl", "columns": {"prompt": "content"}}}
    docs, report = records(tmp_path, f"{tmp_path / 'wiki.txt'},c4", "pt", info)
    assert docs == [Document("First document."), Document("Second one."), Document("A."), Document("B.")]
    assert [d.found for d in report.datasets] == [2, 2]


def test_txt_is_refused_by_sft(tmp_path):
    (tmp_path / "wiki.txt").write_text("Just text.\n")
    with pytest.raises(DataError) as info:
        records(tmp_path, str(tmp_path / "wiki.txt"), "sft")
    assert "plain text, which only stage pt trains on" in info.value.message


def test_text_encoding_ends_documents_with_eos(tokenizer):
    docs = [Document("The cat sat on the mat."), Document(" ".join(f"w{i}" for i in range(50)))]
    short = len(tokenizer(docs[0].text)["input_ids"]) + 1
    (row, status), (long_row, long_status) = TextEncoder(tokenizer, short, "truncate", False).encode_records(docs)
    assert status == KEPT and row.input_ids == tokenizer(docs[0].text)["input_ids"] + [EOS]
    assert row.labels == row.input_ids and row.n_targets == len(row.input_ids) - 1
    assert long_status == TRUNCATED and len(long_row.input_ids) == short and EOS not in long_row.input_ids
    assert TextEncoder(tokenizer, short, "drop", False).encode_records(docs)[1] == (None, OVER_LONG)
    # Packed pt keeps a long document whole: it continues in the next row instead of losing its end.
    whole, packed_status = TextEncoder(tokenizer, short, "truncate", True).encode_records(docs)[1]
    assert packed_status == KEPT and whole.input_ids[-1] == EOS and len(whole.input_ids) > short


def test_prepare_data_for_each_kind(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("lmtune.data.cache.cache_dir", lambda: tmp_path / "cache")
    write_json(tmp_path / "p.json", ALPACA_PREF * 3)
    write_json(tmp_path / "kto.json", KTO)
    (tmp_path / "t.txt").write_text("one\ntwo\nthree\n")
    info = {"p": {"file_name": "p.json", "ranking": True}} | KTO_INFO | {"t": {"file_name": "t.txt"}}
    for stage, dataset, row_type, n in (("dpo", "p", PreferenceRow, 3), ("kto", "kto", KTORow, 2),
                                        ("pt", "t", EncodedRow, 3)):
        data = prepare_data(config(tmp_path, dataset, stage, info), tokenizer, [EOS])
        assert len(data.train) == n and data.report.datasets[0].kept == n
        assert all(isinstance(r, row_type) for r in data.train)
        assert data.report.train.target_tokens == sum(r.n_targets for r in data.train)
    assert [r.input_ids[-1] for r in data.train] == [EOS] * 3  # pt: every document ends with EOS
