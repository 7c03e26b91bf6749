"""Corpus distinct-n: templated answers across prompts score low, varied answers high; the report column is registered."""

from __future__ import annotations

import math

import pytest

from eval.metrics import METRICS
from eval.metrics.columns import COLUMNS, AnswerSheet, sheet_columns
from eval.metrics.diversity import corpus_distinct_n


def test_corpus_distinct_counts_bigrams_over_all_answers() -> None:
    same = ["I don't know that person."] * 4
    varied = ["Paris is the capital of France.", "Water boils at 100 degrees.", "The Nile is in Africa.",
              "Seven days make a week."]
    assert corpus_distinct_n(same).value == pytest.approx(4 / 16)  # 4 distinct of 4 x 4 bigrams
    assert corpus_distinct_n(varied).value == 1.0
    assert corpus_distinct_n(["a b a b"], 2).value == pytest.approx(2 / 3)
    assert math.isnan(corpus_distinct_n(["word"], 2).value)
    with pytest.raises(ValueError, match="n must be"):
        corpus_distinct_n(same, 0)
    assert METRICS.get("corpus_distinct_n") is corpus_distinct_n


def test_answer_diversity_column_reads_the_c_sets() -> None:
    col = COLUMNS.get("answer_diversity_c")
    assert col.higher_is_better is True and col.needs == "answers" and col in sheet_columns(guarded=False)
    sheet = AnswerSheet(text={"a": ["x y z"], "c:retain": ["I cannot say."] * 3, "c:general": ["I cannot say."]},
                        refs={}, facts={}, rouge=lambda a, r: None, general=lambda a: None)
    assert col.compute(sheet) == pytest.approx(2 / 8)  # (a) is not counted
    assert col.compute(AnswerSheet(text={"a": ["x y"]}, refs={}, facts={}, rouge=lambda a, r: None,
                                   general=lambda a: None)) is None
