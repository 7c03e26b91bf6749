"""Our metrics against the reference implementations' conventions, on hand-computed inputs.

MUSE (swj0419/muse_bench ``eval.py``, ``metrics/privleak.py``, ``metrics/logger.py``),
open-unlearning (``src/evals/metrics/*``, ``configs/eval/*``) and lm-evaluation-harness
(``lm_eval/api/task.py``, ``lm_eval/api/model.py``, ``lm_eval/tasks/wmdp/*.yaml``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from core.models import tiny_tokenizer
from core.schema import MCQItem
from eval.metrics import (
    MIN_K_DEFAULT,
    WMDP_SUBJECTS,
    TokenScores,
    choice_length,
    cloze_logprobs,
    extraction_strength_from_greedy,
    mcq_accuracy,
    mcq_prompt,
    mia_auc,
    min_k_from_logprobs,
    min_k_prob,
    privleak,
    rouge_l_f1,
    rouge_l_recall,
)
from eval.metrics import mcq as mcq_mod
from eval.metrics.mcq import encode_pair


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


# ------------------------------------------------------------------------------------------------
# Min-K%: k = 0.4, count floor(n * k), at least one token
# ------------------------------------------------------------------------------------------------

def test_min_k_default_is_muse_and_open_unlearning_k() -> None:
    assert MIN_K_DEFAULT == 0.4
    assert inspect.signature(min_k_from_logprobs).parameters["k"].default == 0.4
    assert inspect.signature(min_k_prob).parameters["k"].default == 0.4


def test_min_k_at_0_4_floors_the_count() -> None:
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
    # 7 * 0.4 = 2.8 -> int() = 2 tokens (-7, -6); ceil would take 3 (-6.0), round 3 as well.
    assert min_k_from_logprobs(lp) == pytest.approx(-6.5)
    assert min_k_from_logprobs(lp[:5]) == pytest.approx(-4.5)  # 5 * 0.4 = 2: -5, -4
    # 2 * 0.4 = 0.8 -> 0 tokens: open-unlearning's floor of one takes the minimum (MUSE would give NaN).
    assert min_k_from_logprobs([-0.5, -3.0]) == pytest.approx(-3.0)
    assert min_k_from_logprobs([-0.5, -3.0, -1.0]) == pytest.approx(-3.0)  # 1.2 -> 1


# ------------------------------------------------------------------------------------------------
# PrivLeak: percent, MUSE's AUC orientation
# ------------------------------------------------------------------------------------------------

def test_privleak_is_percent_in_muse_orientation() -> None:
    from sklearn.metrics import roc_auc_score

    # Unlearned model: forget texts look more member-like than holdout in 8 of 9 pairs.
    f_u, h_u = [3.0, 4.0, 5.0], [1.0, 2.0, 3.5]
    # Retain model: 3 of 9 pairs.
    f_r, h_r = [1.0, 2.0, 3.0], [1.5, 2.5, 3.5]
    auc_u, auc_r = mia_auc(f_u, h_u), mia_auc(f_r, h_r)
    assert (auc_u.value, auc_r.value) == pytest.approx((8 / 9, 3 / 9))
    # MUSE labels forget 0 and holdout 1 and ranks by the Min-K% log-prob: its AUC is 1 - ours.
    muse_u = roc_auc_score([0, 0, 0, 1, 1, 1], f_u + h_u)
    muse_r = roc_auc_score([0, 0, 0, 1, 1, 1], f_r + h_r)
    assert (muse_u, muse_r) == pytest.approx((1 / 9, 6 / 9))
    res = privleak(auc_u, auc_r)
    # (AUC_unlearn - AUC_retain) / AUC_retain * 100 on MUSE's AUCs: (1/9 - 6/9) / (6/9) * 100
    assert res.value == pytest.approx(-250 / 3)
    assert res.value == pytest.approx((muse_u - muse_r) / muse_r * 100)
    assert res.details["fraction"] == pytest.approx(-5 / 6)
    assert res.details["auc_unlearned"] == pytest.approx(1 / 9) and res.details["auc_retain"] == pytest.approx(6 / 9)


def test_privleak_sign_under_and_over_unlearning() -> None:
    assert privleak(1.0, 0.5).value == pytest.approx(-100.0)  # target-like: leaks
    assert privleak(0.3, 0.55).value == pytest.approx((0.7 - 0.45) / 0.45 * 100)  # over-unlearned: positive
    assert privleak(0.55, 0.55).value == 0.0


# ------------------------------------------------------------------------------------------------
# ROUGE-L: MUSE's unstemmed F1, TOFU's stemmed recall
# ------------------------------------------------------------------------------------------------

def test_rouge_l_f1_hand_value() -> None:
    res = rouge_l_f1(["the cat on the mat"], ["the cat sat on the mat"])
    # LCS 5: precision 5/5, recall 5/6, F1 = 2PR / (P + R) = 10/11
    assert res.value == pytest.approx(10 / 11) and res.per_item == pytest.approx([10 / 11])
    assert res.name == "rougeL_f1" and res.details == {"use_stemmer": False}
    assert rouge_l_recall(["the cat on the mat"], ["the cat sat on the mat"]).value == pytest.approx(5 / 6)


def test_rouge_l_f1_does_not_stem_by_default() -> None:
    pred, ref = ["Cats running"], ["cat runs"]
    assert rouge_l_f1(pred, ref).value == 0.0  # MUSE: use_stemmer=False
    assert rouge_l_f1(pred, ref, use_stemmer=True).value == pytest.approx(1.0)
    assert rouge_l_recall(pred, ref).value == pytest.approx(1.0)  # TOFU: stemmed


def test_rouge_l_matches_the_package_and_empty_is_nan() -> None:
    from rouge_score import rouge_scorer

    preds = ["Paris is the capital of France", "no overlap", "a b c d"]
    refs = ["The capital of France is Paris", "something else", "a c"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    assert rouge_l_f1(preds, refs).per_item == pytest.approx(
        [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)])
    assert math.isnan(rouge_l_f1([], []).value) and math.isnan(rouge_l_recall([], []).value)
    with pytest.raises(ValueError, match="pair up"):
        rouge_l_f1(["a"], [])


# ------------------------------------------------------------------------------------------------
# WMDP prompt subjects
# ------------------------------------------------------------------------------------------------

def test_wmdp_subjects_are_lm_eval_descriptions() -> None:
    assert WMDP_SUBJECTS == {"bio": "biology", "chem": "chemistry", "cyber": "cybersecurity"}
    item = MCQItem(question="Q?", choices=["w", "x", "y", "z"], answer=0)
    assert mcq_prompt(item, WMDP_SUBJECTS["cyber"]) == (
        "The following are multiple choice questions (with answers) about cybersecurity.\n\n"
        "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:")


# ------------------------------------------------------------------------------------------------
# Cloze MCQ: acc_norm / acc_bytes lengths, " " + choice scored
# ------------------------------------------------------------------------------------------------

def test_choice_length_excludes_the_delimiter() -> None:
    assert choice_length("Paris") == 5 and choice_length("Paris", "bytes") == 5
    assert choice_length("é") == 1 and choice_length("é", "bytes") == 2
    assert choice_length("") == 1  # no division by zero
    with pytest.raises(ValueError, match="'chars'"):
        choice_length("x", "tokens")  # type: ignore[arg-type]


def _fake_scorer(tok: Any, loglik: dict[str, float]) -> Any:
    """A stand-in for score_continuations: each continuation's total log-likelihood from a table of texts."""
    def score(model: Any, tokenizer: Any, prefixes: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
              **_: Any) -> list[TokenScores]:
        out = []
        for t in targets:
            text = tok.decode(list(t))
            out.append(TokenScores(np.array([loglik[text]]), np.array([False])))
        return out
    return score


def test_cloze_norms_pick_what_lm_eval_picks(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The table is keyed by the decoded continuation: it only answers for " " + choice.
    monkeypatch.setattr(mcq_mod, "score_continuations",
                        _fake_scorer(tok, {" a": -2.0, " bcd": -4.4, " é": -3.0, " ab": -5.0}))
    items = [MCQItem(question="Q1?", choices=["a", "bcd"], answer=1),
             MCQItem(question="Q2?", choices=["é", "ab"], answer=0)]
    chars = cloze_logprobs(object(), tok, items)
    # acc_norm: -2/1 vs -4.4/3; with the space counted (-2/2 vs -4.4/4) the first choice would win.
    assert chars[0] == pytest.approx([-2.0, -4.4 / 3]) and chars[0].argmax() == 1
    assert -2.0 / 2 > -4.4 / 4
    # Characters: -3/1 vs -5/2 picks "ab"; bytes: -3/2 vs -5/2 picks "é".
    assert chars[1] == pytest.approx([-3.0, -2.5]) and chars[1].argmax() == 1
    by = cloze_logprobs(object(), tok, items, norm="bytes")
    assert by[1] == pytest.approx([-1.5, -2.5]) and by[1].argmax() == 0
    assert by[0] == pytest.approx([-2.0, -4.4 / 3])
    res = mcq_accuracy(object(), tok, items, format="cloze")
    assert res.details["predictions"] == [1, 1] and res.value == 0.5 and res.details["norm"] == "chars"
    res_b = mcq_accuracy(object(), tok, items, format="cloze", norm="bytes")
    assert res_b.details["predictions"] == [1, 0] and res_b.value == 1.0 and res_b.details["norm"] == "bytes"
    with pytest.raises(ValueError, match="'chars'"):
        cloze_logprobs(object(), tok, items, norm="words")  # type: ignore[arg-type]


def test_encode_pair_is_lm_eval_split(tok: Any) -> None:
    from tokenizers import processors

    ctx, cont = encode_pair(tok, "Question: Who?\nAnswer:", " Paris")
    assert tok.decode(ctx) == "Question: Who?\nAnswer:" and tok.decode(cont) == " Paris"
    # A trailing context space moves to the continuation.
    assert encode_pair(tok, "Question: Who?\nAnswer: ", "Paris") == (ctx, cont)
    # The context gets the tokenizer's default special tokens (a BOS here), the continuation none.
    bos = tiny_tokenizer()
    bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos.bos_token} $A", special_tokens=[(bos.bos_token, bos.bos_token_id)])
    ctx_b, cont_b = encode_pair(bos, "Question: Who?\nAnswer:", " Paris")
    assert ctx_b == [bos.bos_token_id, *ctx] and cont_b == cont
    with pytest.raises(ValueError, match="empty"):
        encode_pair(tok, "", "x")


# ------------------------------------------------------------------------------------------------
# Extraction strength: k may reach |y| (open-unlearning's loop stops at |y| - 1)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("greedy", "ours", "open_unlearning"), [
    ([False], 0.0, 1.0), ([True, False], 0.0, 0.5), ([False, False, False, False], 0.0, 0.25),
    ([False, True], 0.5, 0.5), ([True, True], 1.0, 1.0)])
def test_extraction_strength_allows_k_equal_n(greedy: list[bool], ours: float, open_unlearning: float) -> None:
    assert extraction_strength_from_greedy(greedy) == pytest.approx(ours)
    # open-unlearning's value, by its loop: k in range(n), first k whose suffix all matches, else n - 1.
    n = len(greedy)
    k = next((k for k in range(n) if all(greedy[k:])), n - 1)
    assert 1 - k / n == pytest.approx(open_unlearning)
    assert (ours == open_unlearning) == any(greedy[-1:])  # they differ exactly when the last token misses
