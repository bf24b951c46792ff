"""Multiple-choice benchmarks: the folder layout, both CSV shapes, one clear error for every bad
file, scoring by the choice letters' logits, and the forgetting deltas of several models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.data.encode import ChatEncoder
from lmtune.errors import ConfigError, DataError
from lmtune.evaluate.benchmarks import (AVERAGE, Scores, SubjectResult, _next_token_logits,
                                        choice_token_ids, forgetting, load_benchmark, pick_choices,
                                        question_messages, read_questions, run_eval,
                                        score_benchmark)

DATA = Path(__file__).resolve().parent.parent / "data"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def bench_folder(root: Path, test_csv: str, dev_csv: str = "Q?,a,b,c,d,A\n",
                 mapping: str = '{"s": {"name": "s", "category": "STEM"}}') -> Path:
    write(root / "mini" / "mapping.json", mapping)
    write(root / "mini" / "data" / "dev" / "s_dev.csv", dev_csv)
    write(root / "mini" / "data" / "test" / "s_test.csv", test_csv)
    return root


def test_headerless_mmlu_rows(tmp_path):
    path = write(tmp_path / "a_test.csv", 'What is 1+1?,1,2,3,"4, or more",B\nWho?,x,y,z,w,d\n')
    questions = read_questions(path)
    assert [(q.question, q.choices, q.answer) for q in questions] == [
        ("What is 1+1?", ["1", "2", "3", "4, or more"], "B"), ("Who?", ["x", "y", "z", "w"], "D")]


def test_header_rows_cmmlu_and_ceval(tmp_path):
    cmmlu = write(tmp_path / "c.csv", ",Question,A,B,C,D,Answer\n0,问题？,甲,乙,丙,丁,C\n")
    ceval = write(tmp_path / "e.csv", "id,question,A,B,C,D,answer,explanation\n"
                                      "0,Which?,p,q,r,s,A,because\n")
    assert [(q.question, q.choices, q.answer) for q in read_questions(cmmlu)] == [
        ("问题？", ["甲", "乙", "丙", "丁"], "C")]
    assert [(q.question, q.choices, q.answer) for q in read_questions(ceval)] == [
        ("Which?", ["p", "q", "r", "s"], "A")]


def test_shipped_samples_load_in_both_shapes():
    mmlu = load_benchmark(str(DATA), "mmlu_sample_test", n_shot=5)
    assert [s.category for s in mmlu.subjects] == ["STEM", "Social Sciences", "Humanities", "Other"]
    assert all(len(s.dev) == 5 and len(s.questions) == 8 for s in mmlu.subjects)
    cmmlu = load_benchmark(str(DATA), "cmmlu_sample_test", n_shot=2)
    assert [len(s.dev) for s in cmmlu.subjects] == [2, 2]
    assert cmmlu.subjects[0].name == "中国地理"
    # zero-shot needs no dev file at all
    assert all(s.dev == [] for s in load_benchmark(str(DATA), "mmlu_sample_test", 0).subjects)


def test_question_frame_is_llamafactorys():
    subject = load_benchmark(str(DATA), "mmlu_sample_test", n_shot=1).subjects[0]
    messages = question_messages(subject, subject.questions[0], "en")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == ("The following are multiple choice questions (with answers) "
                                      "about arithmetic.\n\nWhat is 7 + 5?\nA. 10\nB. 11\nC. 12\n"
                                      "D. 13\nAnswer:")
    assert messages[1]["content"] == "C"
    assert messages[2]["content"].endswith("\nD. 15\nAnswer:")


@pytest.mark.parametrize("files, message", [
    ({"mini/mapping.json": None}, "has no mapping.json"),
    ({"mini/mapping.json": "{not json"}, "mapping.json: not valid JSON"),
    ({"mini/mapping.json": '{"s": {"name": "s"}}'}, "mapping.json: subject 's' needs"),
    ({"mini/data/test/s_test.csv": None}, "subject s of mapping.json has no test file: tried"),
    ({"mini/data/test/s_test.csv": "Q,a,b,c,d,A\nQ2,a,b,c,A\n"}, "s_test.csv: row 2 has 5 columns"),
    ({"mini/data/test/s_test.csv": "Q,a,b,c,d,A\nQ2,a,b,c,d,E\n"}, "s_test.csv: row 2: answer 'E'"),
    ({"mini/data/test/s_test.csv": "question,A,B,answer\nQ,a,b,\n"}, "s_test.csv: row 2: answer ''"),
    ({"mini/data/test/s_test.csv": " ,a,b,c,d,A\n"}, "s_test.csv: row 1: the question is empty"),
    ({"mini/data/test/s_test.csv": "question,A,C,answer\nQ,a,b,A\n"}, "s_test.csv: row 1: the header"),
    ({"mini/data/test/s_test.csv": "Q,A\n"}, "s_test.csv: row 1 has 2 columns"),
    ({"mini/data/test/s_test.csv": ""}, "s_test.csv: no questions"),
    ({"mini/data/dev/s_dev.csv": "Q,a,b,c,d,A\nQ,a,b,c,d,\n"}, "s_dev.csv: row 2: answer ''"),
    ({"mini/data/dev/s_dev.csv": "Q,a,b,A\n"}, "subject s mixes questions with [2, 4] choices"),
])
def test_every_bad_file_gives_one_clear_error(tmp_path, files, message):
    root = bench_folder(tmp_path, "Q,a,b,c,d,A\n")
    for name, text in files.items():
        (root / name).unlink()
        if text is not None:
            write(root / name, text)
    with pytest.raises(DataError) as info:
        load_benchmark(str(root), "mini_test", n_shot=1)
    assert message in str(info.value)
    assert info.value.fix


def test_not_utf8_names_the_file(tmp_path):
    root = bench_folder(tmp_path, "Q,a,b,c,d,A\n")
    (root / "mini/data/test/s_test.csv").write_bytes(b"Q\xff,a,b,c,d,A\n")
    with pytest.raises(DataError, match="s_test.csv: not UTF-8"):
        load_benchmark(str(root), "mini_test", n_shot=1)


def test_bad_task_names(tmp_path):
    with pytest.raises(ConfigError, match="not <benchmark>_<split>"):
        load_benchmark(str(tmp_path), "mmlu", 5)
    with pytest.raises(ConfigError, match="no folder"):
        load_benchmark(str(tmp_path), "mmlu_test", 5)


def test_the_letter_with_the_highest_logit_wins():
    logits = torch.full((3, 10), -5.0)
    ids = [4, 7, 2, 9]  # the tokens of A, B, C, D
    logits[0, 7] = 1.0                       # B highest among the letters
    logits[0, 0] = 9.0                       # a non-letter token higher still: not a choice
    logits[1, [4, 7, 2, 9]] = torch.tensor([0.1, 0.2, 0.3, 0.25])  # C
    logits[2, [4, 7, 2, 9]] = torch.tensor([3.0, -1.0, 2.9, 2.99])  # A
    assert pick_choices(logits, ids) == ["B", "C", "A"]


def test_last_position_logits_equal_an_unpadded_forward(tiny, tokenizer):
    model, _ = tiny
    prompts = [[1, 520, 33, 2048, 9], [1, 77], [1, 300, 301]]
    batched = _next_token_logits(model, prompts, tokenizer.pad_token_id)
    for row, prompt in zip(batched, prompts):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)


def test_benchmark_answers_are_the_argmax_letter(tiny, tokenizer):
    model, encoder = tiny
    bench = load_benchmark(str(DATA), "mmlu_sample_test", n_shot=2)
    scores = score_benchmark(model, tokenizer, encoder, bench, "en", batch_size=3)
    letters = choice_token_ids(tokenizer, 4)
    assert letters == [tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    subject = bench.subjects[1]
    for q, predicted in zip(subject.questions, scores.subjects[1].predictions):
        ids = encoder.prompt_ids(question_messages(subject, q, "en"))
        with torch.no_grad():
            last = model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert predicted == "ABCD"[int(last[letters].argmax())]
    assert sum(len(s.predictions) for s in scores.subjects) == 32


def test_categories_and_forgetting_delta():
    def result(key, category, right, total):
        return SubjectResult(key, key, category, ["A"] * right + ["B"] * (total - right), ["A"] * total)

    base = Scores("t", "base", [result("a", "STEM", 3, 4), result("b", "STEM", 1, 4),
                                result("c", "Other", 2, 2)])
    tuned = Scores("t", "tuned", [result("a", "STEM", 1, 4), result("b", "STEM", 1, 4),
                                  result("c", "Other", 1, 2)])
    assert base.categories() == {"STEM": 50.0, "Other": 100.0, AVERAGE: 60.0}
    assert tuned.categories() == {"STEM": 25.0, "Other": 50.0, AVERAGE: 30.0}
    assert forgetting(base.categories(), tuned.categories()) == {"STEM": -25.0, "Other": -50.0,
                                                                 AVERAGE: -30.0}


def test_eval_several_models_writes_results_and_deltas(tmp_path, tiny_model_dir, random_adapter,
                                                       capsys):
    save = tmp_path / "eval"
    cfg = build_config({"model_name_or_path": tiny_model_dir, "task": "mmlu_sample_test",
                        "task_dir": str(DATA), "n_shot": 1, "batch_size": 8, "save_dir": str(save)})
    # The adapter is applied to the base loaded once, then taken off for the third entry.
    all_scores = run_eval(cfg, [tiny_model_dir, random_adapter, tiny_model_dir])
    out = capsys.readouterr().out
    assert "accuracy against the base" in out
    payload = json.loads((save / "results.json").read_text())
    base, tuned, again = payload["models"]
    assert base["subjects"]["arithmetic"]["total"] == 8
    assert tuned["subjects"] != base["subjects"]
    assert tuned["delta"] == {k: round(tuned["categories"][k] - base["categories"][k], 4)
                              for k in base["categories"]}
    assert again["subjects"] == base["subjects"] and set(again["delta"].values()) == {0.0}
    assert all_scores[1].model == random_adapter
    assert (save / "results.png").stat().st_size > 0
    assert "Average" in (save / "results.log").read_text()


def test_eval_cli_needs_a_task(tmp_path, tiny_model_dir, capsys):
    assert main(["eval", f"model_name_or_path={tiny_model_dir}"]) == 2
    assert "needs task" in capsys.readouterr().err


def test_choice_tokens_are_the_replys_first_token(tokenizer):
    # The logit read is the one the model gives the reply 'B' in the chat template: the letter's
    # token follows the generation prompt unchanged (no merge with the template's newline).
    encoder = ChatEncoder(tokenizer, [tokenizer.eos_token_id], 4096)
    for task, lang in (("mmlu_sample_test", "en"), ("cmmlu_sample_test", "zh")):
        subject = load_benchmark(str(DATA), task, n_shot=2).subjects[0]
        messages = question_messages(subject, subject.questions[0], lang)
        prompt = encoder.prompt_ids(messages)
        full = encoder.tokenize(encoder.render(messages + [{"role": "assistant", "content": "B"}]))
        assert full[: len(prompt)] == prompt
        assert full[len(prompt)] == choice_token_ids(tokenizer, 4)[1]
