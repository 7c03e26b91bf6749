"""Probability metrics on the tiny random Llama: checked against manual log-softmax sums and each other."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.generation import chat_text
from core.models import LoadedLLM, tiny_llm
from core.schema import MCQItem, QAItem
from eval.metrics import (
    answer_probability,
    choice_logprobs,
    extraction_strength,
    extraction_strength_from_greedy,
    mcq_accuracy,
    min_k_from_logprobs,
    min_k_prob,
    model_utility,
    score_answers,
    score_continuations,
    score_texts,
    tofu_model_utility,
    tofu_split_metrics,
    tofu_utility,
    truth_ratio,
    truth_ratios,
)
from eval.metrics.mcq import cloze_logprobs, mcq_prompt

QUESTIONS = ["Where was the author born?", "What is the capital of France?", "Hi"]
ANSWERS = ["The author was born in a small coastal town.", "Paris", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def llm() -> LoadedLLM:
    return tiny_llm(seed=0)


def _manual_answer_logprobs(llm: LoadedLLM, question: str, answer: str) -> np.ndarray:
    """Log-probs of the answer tokens by one unpadded forward and a full log_softmax."""
    import torch

    tok = llm.tokenizer
    p = tok(chat_text(tok, question), add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = llm.model(torch.tensor([p + a])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)[len(p) - 1:-1]
    return lp.gather(-1, torch.tensor(a)[:, None])[:, 0].numpy()


def test_answer_probability_matches_manual_log_softmax(llm: LoadedLLM) -> None:
    res = answer_probability(llm.model, llm.tokenizer, QUESTIONS, ANSWERS, batch_size=8)
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        manual = _manual_answer_logprobs(llm, q, a)
        assert res.per_item[i] == pytest.approx(math.exp(manual.mean()), rel=1e-4)
    assert res.value == pytest.approx(np.mean(res.per_item))
    # A LoadedLLM works in place of (model, tokenizer).
    assert answer_probability(llm, None, QUESTIONS, ANSWERS).per_item == pytest.approx(res.per_item, rel=1e-5)


def test_batched_scoring_equals_one_at_a_time(llm: LoadedLLM) -> None:
    batched = score_answers(llm, None, QUESTIONS, ANSWERS, batch_size=3)
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        single = score_answers(llm, None, [q], [a], batch_size=1)[0]
        assert batched[i].logprobs == pytest.approx(single.logprobs, abs=1e-4)
        assert (batched[i].greedy == single.greedy).all()


def test_truncation_keeps_the_answer(llm: LoadedLLM) -> None:
    full = score_answers(llm, None, QUESTIONS[:1], ANSWERS[:1], max_length=None)[0]
    cut = score_answers(llm, None, QUESTIONS[:1], ANSWERS[:1], max_length=full.n + 3)[0]
    assert cut.n == full.n  # prompt tokens dropped from the left, answer kept whole
    tiny = score_answers(llm, None, QUESTIONS[:1], ANSWERS[:1], max_length=4)[0]
    assert tiny.n == 3


def test_truth_ratio_composes_answer_probabilities(llm: LoadedLLM) -> None:
    items = [QAItem(question=QUESTIONS[0], answer=ANSWERS[0], paraphrased_answer="It was a small coastal town.",
                    perturbed_answers=["The author was born in Paris.", "The author was born in a big city."]),
             QAItem(question=QUESTIONS[1], answer="Paris", perturbed_answers=["Berlin", "Rome", "Madrid"])]
    r = truth_ratios(llm, None, items)
    for i, it in enumerate(items):
        para = math.log(answer_probability(llm, None, [it.question], [it.paraphrased_answer or it.answer]).value)
        pert = [math.log(answer_probability(llm, None, [it.question], [a]).value) for a in it.perturbed_answers]
        assert r[i] == pytest.approx(math.exp(np.mean(pert) - para), rel=1e-4)
    res = truth_ratio(llm, None, items, form="forget")
    assert res.per_item == pytest.approx([min(x, 1 / x) for x in r], rel=1e-6)
    with pytest.raises(ValueError, match="no perturbed_answers"):
        truth_ratios(llm, None, [QAItem(question="q", answer="a")])


def test_extraction_strength_with_greedy_targets(llm: LoadedLLM) -> None:
    import torch

    tok = llm.tokenizer
    prompt = tok(chat_text(tok, QUESTIONS[0]), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = llm.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    wrong_last = gen[:-1] + [(gen[-1] + 1) % len(tok)]
    s_gen, s_wrong = score_continuations(llm, None, [prompt, prompt], [gen, wrong_last])
    assert s_gen.greedy.all() and extraction_strength_from_greedy(s_gen.greedy) == 1.0
    assert extraction_strength_from_greedy(s_wrong.greedy) == 0.0
    res = extraction_strength(llm, None, QUESTIONS, ANSWERS)
    assert all(0.0 <= v <= 1.0 for v in res.per_item)


def test_min_k_prob_matches_manual(llm: LoadedLLM) -> None:
    import torch

    text = "His father was a teacher and his mother was a nurse who worked in the city hospital."
    res = min_k_prob(llm, None, [text, "x"], k=0.2)
    default = min_k_prob(llm, None, [text])
    ids = llm.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    assert res.per_item[0] == pytest.approx(min_k_from_logprobs(lp, 0.2), abs=1e-4)
    k40 = np.sort(lp)[:int(len(lp) * 0.4)].mean()  # the 40% least likely tokens
    assert default.details["k"] == 0.4 and default.per_item[0] == pytest.approx(k40, abs=1e-4)
    assert math.isnan(res.per_item[1]) and res.value == pytest.approx(res.per_item[0])  # 1-token text unscorable
    assert score_texts(llm, None, [text], max_length=5)[0].n == 4


def test_mcq_fast_path_matches_full_scoring(llm: LoadedLLM) -> None:
    items = [MCQItem(question="What is the capital of France?", choices=["Paris", "Rome", "Oslo", "Bern"], answer=0,
                     subject="geography"),
             MCQItem(question="Which is a colour?", choices=["red", "seven"], answer=0, subject="art")]
    lp = choice_logprobs(llm, None, items)
    assert lp.shape == (2, 4) and np.isneginf(lp[1, 2:]).all()
    tok = llm.tokenizer
    for i, it in enumerate(items):
        prefix = tok(mcq_prompt(it), add_special_tokens=False)["input_ids"]
        for j in range(len(it.choices)):
            letter = tok(" " + "ABCD"[j], add_special_tokens=False)["input_ids"]
            full = score_continuations(llm, None, [prefix], [letter])[0].sum_logprob()
            assert lp[i, j] == pytest.approx(full, abs=1e-4)
    res = mcq_accuracy(llm, None, items)
    assert res.details["predictions"] == lp.argmax(1).tolist()
    assert res.value == pytest.approx(np.mean([p == it.answer for p, it in zip(lp.argmax(1), items, strict=True)]))
    with pytest.raises(ValueError, match="at least one"):
        mcq_accuracy(llm, None, [])


def test_mcq_cloze_is_length_normalised_choice_likelihood(llm: LoadedLLM) -> None:
    import torch

    items = [MCQItem(question="What is the capital of France?", choices=["Paris", "Rome", "the city of Oslo"], answer=0),
             MCQItem(question="Which is a colour?", choices=["red", "seven", "café"], answer=1),
             MCQItem(question="Is it?", choices=["yes", "no"], answer=0)]
    lp = cloze_logprobs(llm, None, items)
    lp_bytes = cloze_logprobs(llm, None, items, norm="bytes")
    assert lp.shape == (3, 3) and np.isneginf(lp[2, 2]) and np.isfinite(lp[:2]).all()
    tok = llm.tokenizer
    for i, it in enumerate(items):
        p = tok(f"Question: {it.question}\nAnswer:", add_special_tokens=False)["input_ids"]
        for j, c in enumerate(it.choices):
            a = tok(" " + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = llm.model(torch.tensor([p + a])).logits[0]
            manual = torch.log_softmax(logits.double(), -1)[len(p) - 1:-1].gather(-1, torch.tensor(a)[:, None]).sum()
            # lm-eval's acc_norm: " " + choice is scored, the length is the choice's alone, in characters.
            assert lp[i, j] == pytest.approx(float(manual) / len(c), abs=1e-4)
            assert lp_bytes[i, j] == pytest.approx(float(manual) / len(c.encode("utf-8")), abs=1e-4)
    res = mcq_accuracy(llm, None, items, format="cloze")
    assert res.details == {"predictions": lp.argmax(1).tolist(), "n": 3, "format": "cloze", "norm": "chars"}
    res_b = mcq_accuracy(llm, None, items, format="cloze", norm="bytes")
    assert res_b.details["predictions"] == lp_bytes.argmax(1).tolist() and res_b.details["norm"] == "bytes"
    with pytest.raises(ValueError, match="'letter' and 'cloze'"):
        mcq_accuracy(llm, None, items, format="essay")  # type: ignore[arg-type]


def test_tofu_split_metrics_and_utility(llm: LoadedLLM) -> None:
    retain = [QAItem(question=QUESTIONS[0], answer=ANSWERS[0], paraphrased_answer="A small coastal town.",
                     perturbed_answers=["A big city."])]
    facts = [QAItem(question=QUESTIONS[1], answer="Paris", perturbed_answers=["Rome", "Oslo"], kind="world_facts")]
    res = {"retain": tofu_split_metrics(llm, None, retain, "retain", predictions=[ANSWERS[0]]),
           "world_facts": tofu_split_metrics(llm, None, facts, "world_facts", max_new_tokens=4)}
    assert res["retain"]["rougeL_recall"].value == pytest.approx(1.0)
    assert set(res["world_facts"]) == {"rougeL_recall", "prob", "truth_ratio"}
    assert 0.0 < res["world_facts"]["prob"].value < 1.0
    mu = tofu_model_utility({**res, "forget": res["retain"]})
    assert len(mu.details["components"]) == 6 and all(not k.startswith("forget") for k in mu.details["components"])


def _logp(llm: LoadedLLM, question: str, answer: str) -> float:
    """Length-normalised log-probability of one answer."""
    return math.log(answer_probability(llm, None, [question], [answer]).value)


def test_tofu_option_splits_compare_the_answer_not_a_paraphrase(llm: LoadedLLM) -> None:
    # open-unlearning's ra/wf truth ratio uses *_Q_A_Prob (the answer), retain's the paraphrase.
    item = QAItem(question=QUESTIONS[1], answer="Paris", paraphrased_answer="The city of Paris",
                  perturbed_answers=["Rome", "Oslo"], kind="world_facts")
    res = tofu_split_metrics(llm, None, [item], "world_facts", predictions=["Paris"])
    ans, pert = _logp(llm, item.question, "Paris"), [_logp(llm, item.question, a) for a in item.perturbed_answers]
    r = math.exp(np.mean(pert) - ans)
    assert res["truth_ratio"].details["ratios"] == pytest.approx([r], rel=1e-4)
    assert res["truth_ratio"].value == pytest.approx(max(0.0, 1 - r), rel=1e-4, abs=1e-6)
    p = [math.exp(x) for x in (ans, *pert)]
    assert res["prob"].value == pytest.approx(p[0] / sum(p), rel=1e-4)
    retain = tofu_split_metrics(llm, None, [item.model_copy(update={"kind": "fact"})], "retain", predictions=["Paris"])
    para = _logp(llm, item.question, "The city of Paris")
    assert retain["truth_ratio"].details["ratios"] == pytest.approx([math.exp(np.mean(pert) - para)], rel=1e-4)
    with pytest.raises(ValueError, match="no perturbed_answers"):
        tofu_split_metrics(llm, None, [QAItem(question="q", answer="a")], "real_authors", predictions=["a"])


def test_tofu_utility_is_the_harmonic_mean_of_nine_components(llm: LoadedLLM) -> None:
    from scipy.stats import hmean

    retain = [QAItem(question=QUESTIONS[0], answer=ANSWERS[0], paraphrased_answer="A small coastal town.",
                     perturbed_answers=["A big city.", "A mountain village."])]
    authors = [QAItem(question="Who wrote Hamlet?", answer="William Shakespeare",
                      perturbed_answers=["Charles Dickens", "Jane Austen"], kind="real_authors")]
    facts = [QAItem(question=QUESTIONS[1], answer="Paris", perturbed_answers=["Rome", "Oslo"], kind="world_facts")]
    preds = {"retain": [ANSWERS[0]], "real_authors": ["Charles Dickens"], "world_facts": ["Paris, France"]}
    # rougeL_recall of "Charles Dickens" against "William Shakespeare" is 0: utility 0, as scipy's hmean.
    mu = tofu_utility(llm, None, retain, authors, facts, predictions=preds)
    comps = mu.details["components"]
    assert set(comps) == {f"{s}/{m}" for s in ("retain", "real_authors", "world_facts")
                          for m in ("prob", "rougeL_recall", "truth_ratio")}
    assert mu.name == "tofu_model_utility" and mu.details["n"] == {"retain": 1, "real_authors": 1, "world_facts": 1}
    for split, items in (("retain", retain), ("real_authors", authors), ("world_facts", facts)):
        each = tofu_split_metrics(llm, None, items, split, predictions=preds[split])  # type: ignore[arg-type]
        for m, r in each.items():
            assert comps[f"{split}/{m}"] == pytest.approx(r.value, rel=1e-6)
    assert comps["retain/rougeL_recall"] == pytest.approx(1.0) and comps["real_authors/rougeL_recall"] == 0.0
    assert mu.value == 0.0 and mu.per_item == pytest.approx(list(comps.values()))
    preds["real_authors"] = ["William Shakespeare"]
    mu = tofu_utility(llm, None, retain, authors, facts, predictions=preds)
    vals = list(mu.details["components"].values())
    assert len(vals) == 9 and mu.value == pytest.approx(hmean(vals) if min(vals) > 0 else 0.0)
    assert model_utility([0.5, 0.25, 1.0]).value == pytest.approx(hmean([0.5, 0.25, 1.0]))
    with pytest.raises(ValueError, match="no perturbed_answers"):
        tofu_utility(llm, None, [QAItem(question="q", answer="a")], authors, facts, predictions=preds)
    with pytest.raises(ValueError, match="needs real_authors items"):
        tofu_utility(llm, None, retain, [], facts, predictions=preds)
    with pytest.raises(ValueError, match="unknown splits"):
        tofu_utility(llm, None, retain, authors, facts, predictions={"forget": ["x"]})
