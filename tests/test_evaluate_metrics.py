"""BLEU-4 and ROUGE as LLaMA-Factory computes them, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from lmtune.evaluate.metrics import bleu4, rouge, row_scores, similarity


def test_bleu4_counts_characters_with_smoothing_method_3():
    # 'abc' against 'abcd': 1-, 2-, 3-gram precisions 1; no 4-gram, which method 3 smooths to 1/2;
    # brevity penalty exp(1 - 4/3).
    assert bleu4("abc", "abcd") == pytest.approx(round(100 * math.exp(-1 / 3) * 0.5 ** 0.25, 4))
    # 'the cat sat' / 'the cat ran' (11 characters each): clipped n-gram matches 9/11, 7/10,
    # 6/9 and 5/8, no brevity penalty.
    expected = 100 * (9 / 11 * 7 / 10 * 6 / 9 * 5 / 8) ** 0.25
    assert bleu4("the cat sat", "the cat ran") == pytest.approx(round(expected, 4))
    assert bleu4("abcd", "abcd") == 100.0


def test_bleu4_chinese_characters():
    # 我爱北京 / 我爱上海: unigrams 2/4, bigrams 1/3, trigrams 0/2 -> 1/(2*2), 4-grams 0/1 -> 1/(4*1).
    expected = 100 * (0.5 * (1 / 3) * 0.25 * 0.25) ** 0.25
    assert bleu4("我爱北京", "我爱上海") == pytest.approx(round(expected, 4))


def test_rouge_over_jieba_tokens():
    # English words are jieba tokens: 2 of 3 unigrams shared, 1 of 2 bigrams, LCS 'the cat'.
    assert rouge("the cat sat", "the cat ran") == {"rouge-1": 66.6667, "rouge-2": 50.0,
                                                   "rouge-l": 66.6667}
    # jieba cuts 我/爱/北京 and 我/爱/上海: the same counts in Chinese.
    assert rouge("我爱北京", "我爱上海") == {"rouge-1": 66.6667, "rouge-2": 50.0, "rouge-l": 66.6667}
    # Whole words, not characters: '北京' and '北方' share a character but no token.
    assert rouge("北京", "北方")["rouge-1"] == 0.0


def test_an_empty_side_scores_zero():
    assert rouge("", "anything") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert row_scores("", "abc")["bleu-4"] == 0.0


def test_similarity_averages_rows_under_llamafactory_names():
    scores = similarity(["the cat sat", "exactly"], ["the cat ran", "exactly"])
    assert set(scores) == {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2",
                           "predict_rouge-l", "predict_exact_match"}
    assert scores["predict_exact_match"] == 50.0
    assert scores["predict_rouge-1"] == pytest.approx((66.6667 + 100) / 2, abs=1e-4)
    # One token on each side has no bigram: rouge_chinese gives 0, and so do we.
    assert scores["predict_rouge-2"] == pytest.approx(25.0)
    assert scores["predict_bleu-4"] == pytest.approx((bleu4("the cat sat", "the cat ran") + 100) / 2,
                                                     abs=1e-4)
