"""BLEU-4, ROUGE-1/2/L and exact match of generated answers against reference answers.

Computed the way LLaMA-Factory's predict computes them, so the numbers of the two tools compare:
BLEU-4 is NLTK's sentence BLEU with smoothing method 3 over characters; ROUGE is rouge_chinese's F
score over jieba tokens joined by spaces (0 when either side has no token); each is x100, rounded
to 4 places per row, then averaged over rows. Character BLEU and jieba tokens serve English and
Chinese alike, which is why LLaMA-Factory chose them.
"""

from __future__ import annotations

import logging
from functools import lru_cache

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    # jieba logs its dictionary load at INFO on first use; it means nothing to a user.
    jieba.setLogLevel(logging.WARNING)
    return jieba


def bleu4(predict: str, label: str) -> float:
    """Character-level BLEU-4 (x100, 4 places) with NLTK's smoothing method 3."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    score = sentence_bleu([list(label)], list(predict),
                          smoothing_function=SmoothingFunction().method3)
    return round(float(score) * 100, 4)


def rouge(predict: str, label: str) -> dict[str, float]:
    """ROUGE-1, -2 and -L F scores (x100, 4 places) over jieba tokens."""
    from rouge_chinese import Rouge

    jieba = _jieba()
    hypothesis = " ".join(jieba.cut(predict))
    reference = " ".join(jieba.cut(label))
    if not hypothesis.split() or not reference.split():
        return dict.fromkeys(ROUGE_KEYS, 0.0)
    scores = Rouge().get_scores(hypothesis, reference)[0]
    return {key: round(scores[key]["f"] * 100, 4) for key in ROUGE_KEYS}


def row_scores(predict: str, label: str) -> dict[str, float]:
    return {"bleu-4": bleu4(predict, label), **rouge(predict, label),
            "exact_match": 100.0 if predict.strip() == label.strip() else 0.0}


def similarity(predicts: list[str], labels: list[str], prefix: str = "predict_") -> dict[str, float]:
    """The mean of every row's scores, named as LLaMA-Factory's predict_results.json names them
    (predict_bleu-4, predict_rouge-1, predict_rouge-2, predict_rouge-l) plus exact match."""
    if len(predicts) != len(labels):
        raise ValueError(f"{len(predicts)} predictions for {len(labels)} labels")
    if not predicts:
        return {}
    rows = [row_scores(p, l) for p, l in zip(predicts, labels)]
    return {f"{prefix}{key}": round(sum(r[key] for r in rows) / len(rows), 4) for key in rows[0]}
