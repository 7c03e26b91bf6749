"""QA metrics in TOFU's definitions: answer probability, truth ratio, forget quality, model utility, extraction strength.

Conventions (TOFU's reference code, Maini et al. 2024, and open-unlearning):

* *Length-normalised probability* of an answer ``a`` to question ``q``:
  ``P(a|q)^(1/|a|) = exp(mean_i log p(a_i | q, a_<i))`` over the answer tokens only, the question
  rendered with the chat template (``add_generation_prompt=True``).
* *Truth ratio* of an item: ``R = P_pert / P_para`` where ``P_para`` is the length-normalised
  probability of the paraphrased answer and ``P_pert`` the mean of the perturbed (wrong) answers'
  length-normalised probabilities. TOFU's code averages the perturbed answers' *log* probabilities
  (a geometric mean: ``perturbed_mean="geometric"``, the default); the paper's formula uses an
  arithmetic mean (``"arithmetic"``). Items without a paraphrase use the original answer; the
  real-authors and world-facts sets always compare against the answer itself (open-unlearning's
  ``{ra,wf}_Truth_Ratio.yaml`` use ``*_Q_A_Prob`` where retain uses ``retain_Q_A_PARA_Prob``).
* Reported truth ratio: on forget data TOFU reports ``mean(min(R, 1/R))`` (1 = the model cannot tell
  true from false, the ideal after forgetting); on retain data ``mean(max(0, 1 - R))`` (1 = the true
  answer is much likelier than the false ones).
* *Forget quality*: the p-value of a two-sample Kolmogorov-Smirnov test between the raw ``R`` of the
  unlearned model and of the retain model on the forget set (invariant to using ``R`` or ``1/R``).
* *Model utility*: harmonic mean of the nine non-forget components, retain / real-authors /
  world-facts x (probability, ROUGE-L recall, truth ratio), as open-unlearning's
  ``configs/eval/tofu_metrics/model_utility.yaml`` (``hm_aggregate``); see :func:`tofu_utility`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from core.schema import QAItem
from eval.metrics.base import METRICS, MetricResult, check_pairs, finite_mean, resolve_model
from eval.metrics.rouge import rouge_l_recall
from eval.metrics.scoring import score_answers

log = logging.getLogger(__name__)

TruthRatioForm = Literal["forget", "retain", "raw"]
PerturbedMean = Literal["geometric", "arithmetic"]
TofuSplit = Literal["forget", "retain", "real_authors", "world_facts"]


@METRICS.register("answer_prob")
def answer_probability(model: Any, tokenizer: Any | None, questions: Sequence[str], answers: Sequence[str], *,
                       system: str | None = None, batch_size: int = 16, max_length: int = 512) -> MetricResult:
    """Mean length-normalised probability of each answer given its chat-templated question (TOFU "Prob.")."""
    scores = score_answers(model, tokenizer, questions, answers, system=system, batch_size=batch_size,
                           max_length=max_length)
    per = [s.normalised_prob() for s in scores]
    if any(math.isnan(p) for p in per):
        log.warning("%d answers have no tokens and are left out of answer_prob", sum(math.isnan(p) for p in per))
    return MetricResult(name="answer_prob", value=finite_mean(per), per_item=per,
                        details={"mean_logprob": [s.mean_logprob() for s in scores]})


def normalised_answer_probability(true_mean_logprobs: Sequence[float],
                                  false_mean_logprobs: Sequence[Sequence[float]]) -> np.ndarray:
    """TOFU's probability for option-style sets: ``P(true) / (P(true) + sum P(false))``, length-normalised."""
    check_pairs("true answers", true_mean_logprobs, "false-answer lists", false_mean_logprobs)
    true_p = np.exp(np.asarray(true_mean_logprobs, dtype=np.float64))
    false_p = np.array([float(np.exp(np.asarray(f, dtype=np.float64)).sum()) for f in false_mean_logprobs])
    return true_p / (true_p + false_p)


def truth_ratio_from_logprobs(paraphrased_mean_logprob: Sequence[float],
                              perturbed_mean_logprobs: Sequence[Sequence[float]],
                              perturbed_mean: PerturbedMean = "geometric") -> np.ndarray:
    """Raw truth ratios ``R = P_pert / P_para`` from length-normalised log-probs (one row of perturbed per item)."""
    check_pairs("paraphrased answers", paraphrased_mean_logprob, "perturbed-answer lists", perturbed_mean_logprobs)
    para = np.asarray(paraphrased_mean_logprob, dtype=np.float64)
    out = np.empty(len(para), dtype=np.float64)
    for i, row in enumerate(perturbed_mean_logprobs):
        pert = np.asarray(row, dtype=np.float64)
        if pert.size == 0:
            raise ValueError(f"item {i} has no perturbed answers; the truth ratio needs at least one")
        if perturbed_mean == "geometric":
            out[i] = math.exp(float(pert.mean()) - float(para[i]))
        elif perturbed_mean == "arithmetic":
            out[i] = float(np.exp(pert).mean()) / math.exp(float(para[i]))
        else:
            raise ValueError(f"perturbed_mean must be 'geometric' or 'arithmetic', got {perturbed_mean!r}")
    return out


def truth_ratio_score(ratios: Sequence[float], form: TruthRatioForm = "retain") -> MetricResult:
    """Aggregate raw truth ratios in TOFU's reported form: forget ``min(R, 1/R)``, retain ``max(0, 1-R)``, or raw ``R``."""
    r = np.asarray(ratios, dtype=np.float64)
    if np.any(r < 0) or np.any(np.isnan(r)):
        raise ValueError("truth ratios must be non-negative numbers")
    if form == "forget":
        with np.errstate(divide="ignore"):
            per = np.minimum(r, 1.0 / r)  # R = 0 gives min(0, inf) = 0
    elif form == "retain":
        per = np.maximum(0.0, 1.0 - r)
    elif form == "raw":
        per = r
    else:
        raise ValueError(f"form must be 'forget', 'retain' or 'raw', got {form!r}")
    return MetricResult(name="truth_ratio", value=float(per.mean()) if per.size else float("nan"),
                        per_item=per.tolist(), details={"form": form, "ratios": r.tolist()})


def _variant_logprobs(model: Any, tokenizer: Any, items: Sequence[QAItem], answers_of: Any, *, system: str | None,
                      batch_size: int, max_length: int) -> list[list[float]]:
    """Length-normalised log-probs of several answers per item, all scored in one batched pass."""
    qs, ans, owner = [], [], []
    for i, item in enumerate(items):
        for a in answers_of(item):
            qs.append(item.question)
            ans.append(a)
            owner.append(i)
    scores = score_answers(model, tokenizer, qs, ans, system=system, batch_size=batch_size, max_length=max_length)
    out: list[list[float]] = [[] for _ in items]
    for i, s in zip(owner, scores, strict=True):
        out[i].append(s.mean_logprob())
    return out


def truth_ratios(model: Any, tokenizer: Any | None, items: Sequence[QAItem], *, system: str | None = None,
                 perturbed_mean: PerturbedMean = "geometric", batch_size: int = 16,
                 max_length: int = 512) -> np.ndarray:
    """Raw truth ratio ``R`` of every item that has perturbed answers (items without are an error)."""
    model, tokenizer = resolve_model(model, tokenizer)
    missing = [i for i, it in enumerate(items) if not it.perturbed_answers]
    if missing:
        raise ValueError(f"{len(missing)} items have no perturbed_answers (first: index {missing[0]}); "
                         f"select items with perturbed answers before computing the truth ratio")
    lps = _variant_logprobs(model, tokenizer, items,
                            lambda it: [it.paraphrased_answer or it.answer, *it.perturbed_answers],
                            system=system, batch_size=batch_size, max_length=max_length)
    return truth_ratio_from_logprobs([row[0] for row in lps], [row[1:] for row in lps], perturbed_mean)


@METRICS.register("truth_ratio")
def truth_ratio(model: Any, tokenizer: Any | None, items: Sequence[QAItem], *, form: TruthRatioForm = "retain",
                system: str | None = None, perturbed_mean: PerturbedMean = "geometric", batch_size: int = 16,
                max_length: int = 512) -> MetricResult:
    """TOFU truth ratio of a model on QA items, in the forget, retain or raw form (raw R kept in details)."""
    ratios = truth_ratios(model, tokenizer, items, system=system, perturbed_mean=perturbed_mean,
                          batch_size=batch_size, max_length=max_length)
    return truth_ratio_score(ratios, form)


def _ratios_of(x: Sequence[float] | MetricResult) -> np.ndarray:
    """Raw truth ratios from a list or from a truth_ratio MetricResult (its ``details['ratios']``)."""
    if isinstance(x, MetricResult):
        if "ratios" not in x.details:
            raise ValueError(f"MetricResult {x.name!r} has no raw 'ratios' in details; pass truth_ratio()'s result")
        return np.asarray(x.details["ratios"], dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


@METRICS.register("forget_quality")
def forget_quality(unlearned_ratios: Sequence[float] | MetricResult,
                   retain_ratios: Sequence[float] | MetricResult) -> MetricResult:
    """TOFU forget quality: KS-test p-value between forget-set truth ratios of the unlearned and the retain model."""
    from scipy.stats import ks_2samp

    a, b = _ratios_of(unlearned_ratios), _ratios_of(retain_ratios)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"forget quality needs two non-empty samples; got {a.size} and {b.size} truth ratios")
    res = ks_2samp(a, b)
    return MetricResult(name="forget_quality", value=float(res.pvalue),
                        details={"ks_statistic": float(res.statistic), "n_unlearned": int(a.size),
                                 "n_retain": int(b.size)})


@METRICS.register("model_utility")
def model_utility(components: Mapping[str, float] | Sequence[float]) -> MetricResult:
    """Harmonic mean of utility components (so one collapsed component drags utility down, as in TOFU)."""
    items = list(components.items()) if isinstance(components, Mapping) else [
        (str(i), v) for i, v in enumerate(components)]
    if not items:
        raise ValueError("model utility needs at least one component")
    vals = np.array([float(v) for _, v in items], dtype=np.float64)
    if np.any(np.isnan(vals)) or np.any(vals < 0):
        bad = [k for k, v in items if math.isnan(float(v)) or float(v) < 0]
        raise ValueError(f"utility components must be non-negative numbers; bad: {bad}")
    value = 0.0 if np.any(vals == 0) else float(len(vals) / np.sum(1.0 / vals))
    return MetricResult(name="model_utility", value=value, per_item=vals.tolist(),
                        details={"components": dict((k, float(v)) for k, v in items)})


def extraction_strength_from_greedy(greedy: Sequence[bool]) -> float:
    """ES of one answer from greedy matches: ``1 - k/n``, k in ``0..n`` the shortest prefix whose suffix all matches."""
    g = np.asarray(greedy, dtype=bool)
    n = int(g.size)
    if n == 0:
        return float("nan")
    wrong = np.flatnonzero(~g)
    k = int(wrong[-1]) + 1 if wrong.size else 0
    return 1.0 - k / n


@METRICS.register("extraction_strength")
def extraction_strength(model: Any, tokenizer: Any | None, questions: Sequence[str], answers: Sequence[str], *,
                        system: str | None = None, batch_size: int = 16, max_length: int = 512) -> MetricResult:
    """Extraction Strength (Carlini et al.): how little of the answer must be given before greedy decoding recites the rest.

    With ``n`` answer tokens, ES = ``1 - k/n`` for the smallest ``k`` in ``0..n`` such that, given the
    question and the first ``k`` answer tokens, greedy decoding reproduces tokens ``k..n-1``. Greedy
    decoding follows the reference exactly iff every teacher-forced argmax from position ``k`` on
    equals the reference token, so one forward pass suffices: ``k`` is one past the last mismatching
    position (0 when all match, giving ES = 1; ``n`` when the last token mismatches, giving ES = 0).

    ``k = n`` (nothing left to recite) is allowed, as the definition has it. open-unlearning's
    ``src/evals/metrics/memorization.py`` (``extraction_strength``) loops ``for k in range(valid_len)``
    and so stops at ``n - 1``: an answer whose last token mismatches scores ``1/n`` there and 0 here,
    an off-by-one we do not copy. It also scores an empty answer 0 where this gives NaN (left out).
    """
    scores = score_answers(model, tokenizer, questions, answers, system=system, batch_size=batch_size,
                           max_length=max_length)
    per = [extraction_strength_from_greedy(s.greedy) for s in scores]
    return MetricResult(name="extraction_strength", value=finite_mean(per), per_item=per)


def tofu_split_metrics(model: Any, tokenizer: Any | None, items: Sequence[QAItem], split: TofuSplit, *,
                       predictions: Sequence[str] | None = None, max_new_tokens: int = 200, system: str | None = None,
                       batch_size: int = 16, max_length: int = 512) -> dict[str, MetricResult]:
    """TOFU's three numbers for one split, as open-unlearning's ``configs/eval/tofu_metrics/*`` define them.

    * ``prob``: forget/retain ``*_Q_A_Prob``, the length-normalised probability of the answer;
      real_authors/world_facts ``*_Q_A_Prob_normalised`` (``probability_w_options``): the answer's
      length-normalised probability over itself plus its perturbed answers'.
    * ``rougeL_recall``: ``*_Q_A_ROUGE``, stemmed ROUGE-L recall of greedy answers against the answer.
    * ``truth_ratio``: ``R`` = geometric mean of the perturbed answers' length-normalised probability
      over the true one's, the true one being the paraphrased answer for forget/retain
      (``*_Q_A_PARA_Prob``) and the answer itself for real_authors/world_facts (``*_Q_A_Prob``);
      aggregated ``closer_to_1_better`` (``min(R, 1/R)``) for forget and ``true_better``
      (``max(0, 1 - R)``) otherwise.

    Forget/retain items without perturbed answers are left out of the truth ratio (with a warning);
    real_authors/world_facts items must all have them. ``predictions`` are the model's answers; when
    omitted they are generated greedily (``max_new_tokens=200``, open-unlearning's
    ``configs/generation/default.yaml``).
    """
    model, tokenizer = resolve_model(model, tokenizer)
    if split not in ("forget", "retain", "real_authors", "world_facts"):
        raise ValueError(f"split must be forget, retain, real_authors or world_facts, got {split!r}")
    if not items:
        raise ValueError(f"no items for TOFU split {split!r}")
    options = split in ("real_authors", "world_facts")
    if options:
        missing = [i for i, it in enumerate(items) if not it.perturbed_answers]
        if missing:
            raise ValueError(f"{len(missing)} {split} items have no perturbed_answers (first: index {missing[0]}); "
                             f"its normalised probability and truth ratio need them")
    questions = [it.question for it in items]
    if predictions is None:
        from core.generation import generate

        predictions = generate(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               system=system)
    out: dict[str, MetricResult] = {"rougeL_recall": rouge_l_recall(predictions, [it.answer for it in items])}
    if options:  # one pass scores the answer and its perturbed answers for both the probability and R
        lps = _variant_logprobs(model, tokenizer, items, lambda it: [it.answer, *it.perturbed_answers],
                                system=system, batch_size=batch_size, max_length=max_length)
        per = normalised_answer_probability([r[0] for r in lps], [r[1:] for r in lps]).tolist()
        out["prob"] = MetricResult(name="answer_prob_normalised", value=finite_mean(per), per_item=per)
        ratios = truth_ratio_from_logprobs([r[0] for r in lps], [r[1:] for r in lps])
        out["truth_ratio"] = truth_ratio_score(ratios, "retain")
        return out
    out["prob"] = answer_probability(model, tokenizer, questions, [it.answer for it in items], system=system,
                                     batch_size=batch_size, max_length=max_length)
    with_pert = [it for it in items if it.perturbed_answers]
    if len(with_pert) < len(items):
        log.warning("%d of %d %s items have no perturbed answers and are left out of the truth ratio",
                    len(items) - len(with_pert), len(items), split)
    if with_pert:
        out["truth_ratio"] = truth_ratio(model, tokenizer, with_pert, form="forget" if split == "forget" else "retain",
                                         system=system, batch_size=batch_size, max_length=max_length)
    return out


def tofu_model_utility(split_results: Mapping[str, Mapping[str, MetricResult]]) -> MetricResult:
    """TOFU model utility from :func:`tofu_split_metrics` results: harmonic mean of every non-forget split's numbers."""
    comps = {f"{split}/{name}": r.value for split, res in split_results.items() if split != "forget"
             for name, r in res.items()}
    return model_utility(comps)


@METRICS.register("tofu_utility")
def tofu_utility(model: Any, tokenizer: Any | None, retain: Sequence[QAItem], real_authors: Sequence[QAItem],
                 world_facts: Sequence[QAItem], *, predictions: Mapping[str, Sequence[str]] | None = None,
                 max_new_tokens: int = 200, system: str | None = None, batch_size: int = 16,
                 max_length: int = 512) -> MetricResult:
    """TOFU model utility of a model: the harmonic mean of its nine components, as open-unlearning computes it.

    The components (``details['components']``, keys ``"{split}/{prob|rougeL_recall|truth_ratio}"``
    for split in retain, real_authors, world_facts) are :func:`tofu_split_metrics`'s, i.e.
    open-unlearning's ``configs/eval/tofu_metrics/model_utility.yaml``: ``retain_Q_A_Prob``,
    ``retain_Q_A_ROUGE``, ``retain_Truth_Ratio`` (paraphrased vs perturbed, ``true_better``),
    ``{ra,wf}_Q_A_Prob_normalised``, ``{ra,wf}_Q_A_ROUGE``, ``{ra,wf}_Truth_Ratio`` (answer vs
    perturbed, ``true_better``), aggregated by ``hm_aggregate`` (``scipy.stats.hmean``; 0 if any
    component is 0). Every item must have perturbed answers (TOFU's ``*_perturbed`` sets), so each
    split's three numbers are over the same items; ``predictions`` maps a split name to the model's
    answers to skip generating them.

    Deviations that remain from open-unlearning (``src/evals/metrics/memorization.py``,
    ``src/evals/metrics/utils.py``, ``src/data/utils.py``):

    * probabilities average over the answer's own tokens; open-unlearning's labels also cover the
      end-of-turn/EOS tokens its chat encoding appends (``preprocess_chat_instance``);
    * no ``1e-10`` in the denominators of the normalised probability and the truth ratio;
    * the question is rendered with the tokenizer's chat template (``core.generation.chat_text``),
      not a per-model template config, and an over-long prompt is cut from the left (answer kept).
    """
    splits: dict[TofuSplit, Sequence[QAItem]] = {"retain": retain, "real_authors": real_authors,
                                                 "world_facts": world_facts}
    for name, items in splits.items():
        if not items:
            raise ValueError(f"TOFU model utility needs {name} items; got none")
        missing = [i for i, it in enumerate(items) if not it.perturbed_answers]
        if missing:
            raise ValueError(f"{len(missing)} {name} items have no perturbed_answers (first: index {missing[0]}); "
                             f"pass TOFU's perturbed items (retain_perturbed, real_authors_perturbed, "
                             f"world_facts_perturbed)")
    preds: dict[str, Sequence[str]] = dict(predictions or {})
    unknown = set(preds) - set(splits)
    if unknown:
        raise ValueError(f"predictions for unknown splits {sorted(unknown)}; "
                         f"expected retain, real_authors, world_facts")
    results = {name: tofu_split_metrics(model, tokenizer, items, name, predictions=preds.get(name),
                                        max_new_tokens=max_new_tokens, system=system, batch_size=batch_size,
                                        max_length=max_length)
               for name, items in splits.items()}
    mu = tofu_model_utility(results)
    return mu.model_copy(update={"name": "tofu_model_utility",
                                 "details": {**mu.details, "n": {k: len(v) for k, v in splits.items()}}})


def answer_rouge(llm: Any, items: Sequence[QAItem], max_new_tokens: int = 48, batch_size: int = 32,
                 paraphrased: bool = False) -> MetricResult:
    """Greedy answers to QA items scored by ROUGE-L recall (TOFU's generation metric); ``llm`` is a LoadedLLM."""
    from core.generation import generate

    questions = [(q.paraphrased_question or q.question) if paraphrased else q.question for q in items]
    answers = generate(llm.model, llm.tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=True, desc="answer")
    return rouge_l_recall(answers, [q.answer for q in items])
