"""Dataset records -> canonical conversations: formats, dataset_info.json, errors, sampling, splits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import ALPACA, write_json
from lmtune.config import build_config
from lmtune.data.formats import Conversation, DatasetAttr, fill_placeholders, parse_alpaca
from lmtune.data.sources import load_conversations, split_validation
from lmtune.errors import DataError


def load(tmp_path: Path, dataset: str, info: dict | None = None, **cfg):
    if info is not None:
        write_json(tmp_path / "dataset_info.json", info)
    return load_conversations(build_config({"dataset": dataset, "dataset_dir": str(tmp_path), **cfg}))


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def roles(conv: Conversation) -> list[str]:
    return [m["role"] for m in conv.messages]


# --- alpaca -------------------------------------------------------------------------------------

def test_alpaca_instruction_input_system_history(tmp_path):
    write_json(tmp_path / "a.json", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5.",
         "system": "Be terse.", "history": [["Hi", "Hello!"], ["How are you?", "Fine."]]},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "", "input": "only input", "output": "ok"},
    ])
    convs, report = load(tmp_path, "a", {"a": {"file_name": "a.json"}})
    assert convs[0].messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": "Add the numbers.\n2 and 3"},
        {"role": "assistant", "content": "5."},
    ]
    assert convs[1].messages == [{"role": "user", "content": "Say hi."},
                                 {"role": "assistant", "content": "Hi!"}]
    assert convs[2].messages[0] == {"role": "user", "content": "only input"}
    assert convs[0].tools is None
    assert [(d.name, d.found, d.kept) for d in report.datasets] == [("a", 3, 3)]


def test_alpaca_conftest_records_by_path(tmp_path):
    path = write_json(tmp_path / "tiny.json", ALPACA)
    convs, report = load(tmp_path, str(path))
    assert len(convs) == len(ALPACA) == 8
    assert [c.messages[-1]["content"] for c in convs] == [r["output"] for r in ALPACA]
    assert roles(convs[2]) == ["system", "user", "assistant"]
    assert roles(convs[3]) == ["user", "assistant", "user", "assistant"]
    assert convs[1].messages[0]["content"] == "Add the numbers.\n2 and 3"
    assert report.datasets[0].file == str(path)


def test_alpaca_custom_columns(tmp_path):
    write_json(tmp_path / "c.json", [{"q": "Question?", "ctx": "Context.", "a": "Answer.",
                                      "sys": "S."}])
    convs, _ = load(tmp_path, "c", {"c": {"file_name": "c.json", "columns": {
        "prompt": "q", "query": "ctx", "response": "a", "system": "sys"}}})
    assert convs[0].messages == [{"role": "system", "content": "S."},
                                 {"role": "user", "content": "Question?\nContext."},
                                 {"role": "assistant", "content": "Answer."}]


# --- sharegpt -----------------------------------------------------------------------------------

SHAREGPT = [
    {"conversations": [
        {"from": "system", "value": "You are a weather bot."},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": "{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"from": "observation", "value": "{\"temp\": 21}"},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ], "tools": [{"name": "weather"}]},
    {"conversations": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Bye"},
        {"from": "gpt", "value": "Goodbye."},
    ], "system": "Column system."},
]


def test_sharegpt_roles_and_system(tmp_path):
    write_json(tmp_path / "sg.json", SHAREGPT)
    convs, _ = load(tmp_path, "sg", {"sg": {"file_name": "sg.json", "formatting": "sharegpt"}})
    first, second = convs
    assert first.messages == [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]
    assert first.tools == [{"name": "weather"}]
    assert roles(second) == ["system", "user", "assistant", "user", "assistant"]
    assert second.messages[0]["content"] == "Column system."
    assert second.tools is None


def test_sharegpt_leading_system_message_overrides_system_column(tmp_path):
    record = {"system": "from column", "conversations": [
        {"from": "system", "value": "from message"}, {"from": "human", "value": "q"},
        {"from": "gpt", "value": "a"}]}
    write_json(tmp_path / "sg.json", [record])
    convs, _ = load(tmp_path, "sg", {"sg": {"file_name": "sg.json", "formatting": "sharegpt"}})
    assert convs[0].messages[0] == {"role": "system", "content": "from message"}
    assert sum(m["role"] == "system" for m in convs[0].messages) == 1


def test_sharegpt_auto_detected_by_path(tmp_path):
    path = write_json(tmp_path / "sg.json", SHAREGPT)
    convs, _ = load(tmp_path, str(path))
    assert roles(convs[0]) == ["system", "user", "assistant", "tool", "assistant"]


def test_sharegpt_custom_columns_and_tags(tmp_path):
    write_json(tmp_path / "custom.json", [{"dialog": [
        {"speaker": "q", "text": "What is 2+2?"}, {"speaker": "a", "text": "4."},
        {"speaker": "q", "text": "And 3+3?"}, {"speaker": "a", "text": "6."}]}])
    info = {"custom": {"file_name": "custom.json", "formatting": "sharegpt",
                       "columns": {"messages": "dialog"},
                       "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "q",
                                "assistant_tag": "a"}}}
    convs, _ = load(tmp_path, "custom", info)
    assert convs[0].messages == [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]


# --- openai -------------------------------------------------------------------------------------

OPENAI = [
    {"messages": [{"role": "system", "content": "Be kind."},
                  {"role": "user", "content": "Hello?"},
                  {"role": "assistant", "content": "Hello, friend."}]},
    {"messages": [{"role": "user", "content": "Call it."},
                  {"role": "assistant", "content": "calling"},
                  {"role": "tool", "content": "result: 3"},
                  {"role": "assistant", "content": "It returned 3."}]},
]
OPENAI_EXPECTED = [
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"},
     {"role": "assistant", "content": "Hello, friend."}],
    [{"role": "user", "content": "Call it."}, {"role": "assistant", "content": "calling"},
     {"role": "tool", "content": "result: 3"}, {"role": "assistant", "content": "It returned 3."}],
]


def test_openai_registered(tmp_path):
    write_json(tmp_path / "oa.json", OPENAI)
    convs, _ = load(tmp_path, "oa", {"oa": {"file_name": "oa.json", "formatting": "openai"}})
    assert [c.messages for c in convs] == OPENAI_EXPECTED


def test_openai_auto_detected_by_path_without_dataset_info(tmp_path):
    path = write_jsonl(tmp_path / "files" / "oa.jsonl", OPENAI)
    assert not (tmp_path / "dataset_info.json").exists()
    convs, report = load(tmp_path, str(path))
    assert [c.messages for c in convs] == OPENAI_EXPECTED
    assert report.datasets[0].name == str(path)


def test_file_name_relative_to_dataset_dir(tmp_path):
    write_jsonl(tmp_path / "oa.jsonl", OPENAI)
    convs, _ = load(tmp_path, "oa.jsonl")
    assert [c.messages for c in convs] == OPENAI_EXPECTED


# --- json and jsonl -----------------------------------------------------------------------------

def test_jsonl_and_json_list_give_the_same_conversations(tmp_path):
    write_json(tmp_path / "a.json", ALPACA)
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    info = {"list": {"file_name": "a.json"}, "lines": {"file_name": "a.jsonl"}}
    from_list, _ = load(tmp_path, "list", info)
    from_lines, _ = load(tmp_path, "lines")
    assert [c.messages for c in from_list] == [c.messages for c in from_lines]
    assert len(from_lines) == 8


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n" + json.dumps(ALPACA[0]) + "\n\n   \n" + json.dumps(ALPACA[1]) + "\n")
    convs, report = load(tmp_path, str(path))
    assert len(convs) == 2 and report.datasets[0].found == 2


# --- bad records --------------------------------------------------------------------------------

GOOD = {"instruction": "Say hi.", "output": "Hi!"}


@pytest.mark.parametrize("bad,words", [
    ({"instruction": "No answer."}, ["missing field 'output'"]),
    ({"instruction": "Number.", "output": 5}, ["field 'output' must be text", "int"]),
    ({"instruction": "", "input": "", "output": "x"}, ["empty prompt"]),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, ["history turn 0"]),
    ({"instruction": "q", "output": "   "}, ["empty assistant reply"]),
    ("just a string", ["expected an object", "str"]),
])
def test_bad_alpaca_record_names_file_and_index(tmp_path, bad, words):
    path = write_json(tmp_path / "bad.json", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load(tmp_path, "bad", {"bad": {"file_name": "bad.json"}})
    err = info.value
    assert err.message.startswith(f"{path}, record 2: ")
    assert err.file == str(path) and err.record == 2
    for word in words:
        assert word in err.message
    assert err.fix


def turns(*pairs):
    return {"conversations": [{"from": f, "value": v} for f, v in pairs]}


@pytest.mark.parametrize("bad,words", [
    (turns(("human", "a"), ("human", "b"), ("gpt", "c")), ["turn 1 is 'user'", "alternate"]),
    (turns(("human", "a"), ("gpt", "b"), ("human", "c")), ["ends without an assistant reply"]),
    (turns(("human", "a"), ("gpt", "")), ["turn 1 is an empty assistant reply"]),
    (turns(("human", "a"), ("bot", "b")), ["from='bot'", "message 1"]),
    (turns(("gpt", "a"), ("human", "b")), ["turn 0 is 'assistant'"]),
    (turns(("human", "a"), ("system", "s"), ("gpt", "b")), ["message 1 is a system message"]),
    ({"conversations": []}, ["'conversations' must be a non-empty list"]),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     ["message 0 needs text in 'value'"]),
    (turns(("system", "only a system message")), ["no user or assistant messages"]),
])
def test_bad_sharegpt_record_names_file_and_index(tmp_path, bad, words):
    good = turns(("human", "hi"), ("gpt", "hello"))
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad])
    with pytest.raises(DataError) as info:
        load(tmp_path, "bad", {"bad": {"file_name": "bad.jsonl", "formatting": "sharegpt"}})
    err = info.value
    assert err.message.startswith(f"{path}, record 2: ")
    assert err.record == 2
    assert "(sharegpt format)" in err.message
    for word in words:
        assert word in err.message, err.message


def test_invalid_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError) as info:
        load(tmp_path, str(path))
    assert info.value.message.startswith(f"{path}: not valid JSON (line 3,")
    assert info.value.file == str(path)


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{not json}\n")
    with pytest.raises(DataError) as info:
        load(tmp_path, str(path))
    assert info.value.message.startswith(f"{path}, record 2: line 3 is not valid JSON")
    assert "skip_bad_records" in info.value.fix


def test_invalid_jsonl_line_is_skipped_by_skip_bad_records(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json}\n" + json.dumps(GOOD) + "\n")
    records, report = load(tmp_path, str(path), skip_bad_records=True)
    assert len(records) == 2
    assert report.datasets[0].bad == 1 and "line 2" in report.datasets[0].bad_examples[0]


def test_jsonl_string_holding_a_unicode_line_separator_is_one_record(tmp_path):
    record = {"instruction": "a\u2028b\u0085c\u000bd", "output": "e\u2029f"}
    path = tmp_path / "seps.jsonl"
    # ensure_ascii=False writes the separators raw, as most JSON writers do.
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    records, _ = load(tmp_path, str(path))
    assert len(records) == 1
    assert records[0].messages[0]["content"] == record["instruction"]


def test_invalid_dataset_info_json(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"a": {"file_name": "a.json",}}')
    with pytest.raises(DataError) as info:
        load(tmp_path, "a")
    assert "dataset_info.json" in info.value.message and "line 1" in info.value.message


def test_unformattable_file_by_path(tmp_path):
    path = write_json(tmp_path / "x.json", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError) as info:
        load(tmp_path, str(path))
    assert info.value.message.startswith(f"{path}: record 0: cannot tell the format")
    assert "dataset_info.json" in info.value.fix


def test_unsupported_suffix_and_missing_file(tmp_path):
    (tmp_path / "a.xml").write_text("<records/>")
    with pytest.raises(DataError) as info:
        load(tmp_path, "a", {"a": {"file_name": "a.xml"}, "m": {"file_name": "missing.json"}})
    assert "unsupported file type '.xml'" in info.value.message and ".parquet" in info.value.fix
    with pytest.raises(DataError) as info:
        load(tmp_path, "m")
    assert info.value.message == f"{tmp_path / 'missing.json'}: file not found"


@pytest.mark.parametrize("content", ["[]", ""])
def test_empty_file_by_path_is_a_data_error(tmp_path, content):
    path = tmp_path / ("empty.json" if content else "empty.jsonl")
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load(tmp_path, str(path))
    assert "no records" in info.value.message


def test_empty_registered_file_is_a_data_error(tmp_path):
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(DataError) as info:
        load(tmp_path, "e", {"e": {"file_name": "e.json"}})
    assert info.value.message.endswith("e.json: the file holds no records")


# --- mixing and max_samples ---------------------------------------------------------------------

def numbered(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"} for i in range(n)]


def test_mix_in_order_and_max_samples_per_dataset(tmp_path):
    write_json(tmp_path / "a.json", numbered("a", 5))
    write_jsonl(tmp_path / "b.jsonl", numbered("b", 3))
    info = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.jsonl"}}
    convs, report = load(tmp_path, "a,b", info, max_samples=2)
    assert [c.messages[-1]["content"] for c in convs] == [
        "a answer 0", "a answer 1", "b answer 0", "b answer 1"]
    a, b = report.datasets
    assert (a.name, a.found, a.kept, a.dropped_by_max_samples) == ("a", 5, 2, 3)
    assert (b.name, b.found, b.kept, b.dropped_by_max_samples) == ("b", 3, 2, 1)
    assert report.warnings() == ["max_samples=2 keeps the first 2 of 5 rows of a (40.0%), 2 of 3 "
                                 "rows of b (66.7%); 4 of 8 in all (50.0%)"]
    assert report.max_samples == 2


def test_mix_without_max_samples_and_reversed_order(tmp_path):
    write_json(tmp_path / "a.json", numbered("a", 2))
    write_json(tmp_path / "b.json", numbered("b", 1))
    info = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}}
    convs, report = load(tmp_path, "b, a", info)
    assert [c.messages[-1]["content"] for c in convs] == ["b answer 0", "a answer 0", "a answer 1"]
    assert [(d.name, d.found, d.kept, d.dropped_by_max_samples) for d in report.datasets] == [
        ("b", 1, 1, 0), ("a", 2, 2, 0)]
    assert report.warnings() == []


def test_max_samples_larger_than_dataset_drops_nothing(tmp_path):
    write_json(tmp_path / "a.json", numbered("a", 3))
    convs, report = load(tmp_path, "a", {"a": {"file_name": "a.json"}}, max_samples=10)
    assert len(convs) == 3 and report.datasets[0].dropped_by_max_samples == 0
    assert not any("max_samples" in w for w in report.warnings())


def test_max_samples_skips_bad_records_beyond_n(tmp_path):
    write_json(tmp_path / "a.json", numbered("a", 2) + [{"instruction": "broken"}])
    convs, report = load(tmp_path, "a", {"a": {"file_name": "a.json"}}, max_samples=2)
    assert len(convs) == 2 and report.datasets[0].found == 3


# --- data_vars ----------------------------------------------------------------------------------

def test_data_vars_fill_placeholders(tmp_path):
    write_json(tmp_path / "id.json", [
        {"instruction": "Who are you?", "output": "I am {{name}}, made by {{ author }}."},
        {"instruction": "Is {{name}} your name?", "output": "Yes, {{name}}.",
         "system": "You are {{name}}."},
    ])
    convs, report = load(tmp_path, "id", {"id": {"file_name": "id.json"}},
                         data_vars={"name": "Orrin", "author": "Tallis Labs"})
    assert convs[0].messages[-1]["content"] == "I am Orrin, made by Tallis Labs."
    assert [m["content"] for m in convs[1].messages] == [
        "You are Orrin.", "Is Orrin your name?", "Yes, Orrin."]
    assert report.datasets[0].unfilled_placeholders == []
    assert report.warnings() == []


def test_placeholder_without_value_stays_and_is_reported(tmp_path):
    write_json(tmp_path / "id.json", [
        {"instruction": "Who?", "output": "I am {{name}} by {{author}}; {{author}} again."}])
    convs, report = load(tmp_path, "id", {"id": {"file_name": "id.json"}},
                         data_vars={"name": "Orrin"})
    assert convs[0].messages[-1]["content"] == "I am Orrin by {{author}}; {{author}} again."
    assert report.datasets[0].unfilled_placeholders == ["author"]
    assert ("id contains {{author}} with no value in data_vars; they train as literal text"
            in report.warnings())


def test_fill_placeholders_in_tools_and_returns_missing():
    conv = Conversation([{"role": "user", "content": "{{a}} {{b}}"},
                         {"role": "assistant", "content": "{{c}}"}],
                        tools=[{"name": "{{a}}-tool", "parameters": {"{{a}}": ["x {{ a }}", 3]}}])
    missing = fill_placeholders(conv, {"a": 'A"'})
    assert missing == {"b", "c"}
    assert conv.messages[0]["content"] == 'A" {{b}}'
    assert conv.tools == [{"name": 'A"-tool', "parameters": {'A"': ['x A"', 3]}}]


def test_parse_alpaca_directly():
    attr = DatasetAttr(name="x", file_name="x.json")
    conv = parse_alpaca({"instruction": "i", "input": "q", "output": "o"}, attr)
    assert conv.messages == [{"role": "user", "content": "i\nq"}, {"role": "assistant", "content": "o"}]


# --- split_validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,val_size,n_val", [
    (100, 0.1, 10), (100, 0.25, 25), (10, 0.05, 1), (7, 0.5, 4), (100, 3, 3), (50, 49, 49),
])
def test_split_sizes_disjoint_cover(n, val_size, n_val):
    items = list(range(n))
    train, val = split_validation(items, val_size, seed=1)
    assert len(val) == n_val and len(train) == n - n_val
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == items


def test_split_is_deterministic_for_a_seed():
    items = [f"row{i}" for i in range(40)]
    first = split_validation(items, 0.2, seed=42)
    assert split_validation(items, 0.2, seed=42) == first
    others = {tuple(split_validation(items, 0.2, seed=s)[1]) for s in range(5)}
    assert len(others) > 1  # the seed matters
    assert first[1] != items[:8]  # shuffled, not the first rows


def test_split_zero_keeps_everything():
    items = [1, 2, 3]
    assert split_validation(items, 0, seed=0) == ([1, 2, 3], [])


@pytest.mark.parametrize("n,val_size", [(5, 5), (5, 10), (10, 0.99)])
def test_split_too_big_is_a_data_error(n, val_size):
    with pytest.raises(DataError) as info:
        split_validation(list(range(n)), val_size, seed=0)
    assert f"only {n} rows" in info.value.message and info.value.fix


# --- dataset_info problems ----------------------------------------------------------------------

def test_unknown_dataset_lists_known_names(tmp_path):
    info = {"alpha": {"file_name": "a.json"}, "beta": {"file_name": "b.json"}}
    with pytest.raises(DataError) as info_err:
        load(tmp_path, "gamma", info)
    err = info_err.value
    assert "'gamma'" in err.message
    assert "known: alpha, beta" in err.fix


def test_unknown_dataset_with_the_repo_dataset_info():
    repo_data = Path(__file__).resolve().parents[1] / "data"
    with pytest.raises(DataError) as info:
        load_conversations(build_config({"dataset": "identiy", "dataset_dir": str(repo_data)}))
    assert "general_replay" in info.value.fix and "identity" in info.value.fix


def test_ranking_entry_is_refused(tmp_path):
    write_json(tmp_path / "pref.json", [{"instruction": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError) as info:
        load(tmp_path, "pref", {"pref": {"file_name": "pref.json", "ranking": True}})
    assert "'pref'" in info.value.message and "ranking" in info.value.message
    assert "stage sft cannot train on" in info.value.message and "dpo" in info.value.fix
    assert str(tmp_path / "dataset_info.json") in info.value.message


def test_preference_file_by_path_is_refused_by_sft(tmp_path):
    path = write_json(tmp_path / "pref.json", [{"instruction": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError) as info:
        load(tmp_path, str(path))
    assert info.value.message.startswith(f"{path}: the file is preference data")


def test_hub_entry_offline_fails_at_once_naming_the_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's choice: the cache only
    monkeypatch.delenv("LMTUNE_HUB_AUTO", raising=False)
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        load(tmp_path, "hub", {"hub": {"hf_hub_url": "someone/some-data"}})
    assert time.perf_counter() - started < 10  # no connection retries
    assert "offline" in info.value.message and "hf_hub_url someone/some-data" in info.value.message
    assert info.value.message.startswith(str(tmp_path / "dataset_info.json"))
    assert "HF_HUB_OFFLINE=0" in info.value.fix and "file_name" in info.value.fix


def test_entry_with_only_an_unsupported_remote_is_refused(tmp_path):
    with pytest.raises(DataError) as info:
        load(tmp_path, "ms", {"ms": {"ms_hub_url": "someone/data"}})
    assert "ms_hub_url is not supported" in info.value.message and "file_name" in info.value.fix


def test_unknown_formatting_is_refused(tmp_path):
    with pytest.raises(DataError) as info:
        load(tmp_path, "x", {"x": {"file_name": "x.json", "formatting": "chatml"}})
    assert "'chatml'" in info.value.message and "alpaca" in info.value.fix
