"""The forget request / held-out evaluation split: by person, deterministic, and nothing evaluated is held by a system."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.schema import ForgetTarget, ForgetTask, QAItem
from detectors.normalize import normalize
from eval.general import GeneralItem
from eval.split import (
    SplitConfig,
    StoredTexts,
    detector_texts,
    exclude_overlaps,
    parity_check,
    request_texts,
    split_task,
)
from eval.tasks.offline import BenchmarkConfig, generate_benchmark


@pytest.fixture(scope="module")
def task() -> ForgetTask:
    return generate_benchmark(BenchmarkConfig(seed=0))


@pytest.fixture(scope="module")
def split(task):
    return split_task(task, SplitConfig(seed=0))


def _norm_set(texts):
    return {normalize(t) for t in texts}


def test_default_benchmark_counts(split) -> None:
    c = split.counts()
    # Four neighbour people on each side, held out by person; retain people split about in half.
    assert c["people"]["neighbour"] == {"request": 4, "evaluation": 4}
    assert c["people"]["retain"]["request"] >= 4 and c["people"]["retain"]["evaluation"] >= 4
    # Every target keeps about half its facts in the request; the rest and every probe are held out.
    for t, full in zip(split.request.targets, split.task.targets, strict=True):
        n_facts = sum(q.kind == "fact" for q in full.qa)
        assert abs(len(t.qa) - n_facts / 2) <= 1
        assert all(q.kind == "fact" for q in t.qa)
    assert c["in_request"] + c["held_out"]["unseen_fact"] == sum(q.kind == "fact" for q in split.task.forget_qa)
    # Paraphrases and probes of request facts ask about stored answers: kept apart from (b).
    n_para = sum(1 for q in split.task.forget_qa if q.paraphrased_question)
    assert c["held_out"]["paraphrase"] + c["rephrased_request_facts"]["paraphrase"] == n_para
    assert c["held_out"]["paraphrase"] == c["held_out"]["unseen_fact"]
    assert c["held_out"]["alias"] + c["rephrased_request_facts"].get("alias", 0) == 6
    assert c["held_out"]["multihop"] == 4
    req_answers = {normalize(q.answer) for q in split.in_request}
    assert not any(normalize(q.answer) in req_answers for q in split.heldout_items())
    assert c["negatives"]["benign"] == 30


def test_request_holds_no_answer_key(split) -> None:
    for t in split.request.targets:
        assert "facts" not in t.meta and not t.mcq
        for q in t.qa:
            assert q.paraphrased_question is None and q.paraphrased_answer is None and not q.perturbed_answers
    assert not split.request.holdout_texts and not split.request.retain_mcq
    # The evaluation keeps the variants the white-box metrics need.
    assert all(q.perturbed_answers and q.paraphrased_answer for q in split.in_request)


def test_negatives_are_split_by_person(split) -> None:
    for group, req in (("neighbour", split.request.neighbour_qa), ("retain", split.request.retain_qa)):
        seen = {q.subject for q in req}
        held = {q.subject for q in split.negatives[group]}
        assert seen and held and not seen & held, group
    # A held-out person's biography is not among the request's retain texts.
    held_people = {q.subject for g in ("neighbour", "retain") for q in split.negatives[g]}
    for text in split.request.retain_texts:
        assert not any(p and p in text for p in held_people)
    assert not _norm_set(split.request.benign_questions) & _norm_set(split.benign)


def test_split_is_deterministic_and_order_free(task, split) -> None:
    again = split_task(task, SplitConfig(seed=0))
    assert again.request == split.request and again.held_out == split.held_out
    shuffled = task.model_copy(update={"retain_qa": task.retain_qa[::-1], "neighbour_qa": task.neighbour_qa[::-1],
                                       "targets": [t.model_copy(update={"qa": t.qa[::-1]}) for t in task.targets]})
    other = split_task(shuffled, SplitConfig(seed=0))
    assert {q.question for q in other.in_request} == {q.question for q in split.in_request}
    assert {q.subject for q in other.negatives["neighbour"]} == {q.subject for q in split.negatives["neighbour"]}
    moved = split_task(task, SplitConfig(seed=1))
    assert {q.question for q in moved.in_request} != {q.question for q in split.in_request}


def test_no_forget_answer_is_quoted_by_a_forget_text(task) -> None:
    # The offline biographies and manual texts state every fact in their own phrasing.
    for t in task.targets:
        texts = " ".join(normalize(x) for x in t.texts)
        for q in t.qa:
            assert normalize(q.answer) not in texts, q.answer
            if q.paraphrased_answer:
                assert normalize(q.paraphrased_answer) not in texts


def test_parity_holds_on_the_default_benchmark(split) -> None:
    stores = [detector_texts(split.request), request_texts(split.request)]
    rep = parity_check(split, stores)
    assert rep.total == 0, rep.examples
    assert rep.checked["held_out:alias"] == 2 * len(split.held_out["alias"]) > 0
    # Nothing had to be excluded either: the split itself keeps evaluation and request apart.
    assert exclude_overlaps(split, stores).excluded == {}


def test_parity_check_catches_a_planted_overlap(split) -> None:
    held_q = split.held_out["unseen_fact"][0].question
    neg_q = split.negatives["neighbour"][0].question
    leaky = split.request.model_copy(update={"benign_questions": [*split.request.benign_questions, held_q, neg_q]})
    stores = [detector_texts(leaky), request_texts(leaky)]
    rep = parity_check(split, stores)
    assert rep.overlaps["held_out:unseen_fact"] == {"detector": 1}
    assert rep.overlaps["negatives:neighbour"] == {"detector": 1}
    # ... and exclude_overlaps removes exactly those items and says why.
    clean = exclude_overlaps(split, stores)
    assert clean.excluded["unseen_fact"] == {"held by detector": 1}
    assert len(clean.held_out["unseen_fact"]) == len(split.held_out["unseen_fact"]) - 1
    assert parity_check(clean, stores).total == 0


def test_long_answers_count_as_held_when_a_stored_text_quotes_them() -> None:
    t = ForgetTarget(id="p", kind="privacy", names=["Ana Ruiz"], policy="p",
                     texts=["Ana Ruiz was born in Lower Alder in 1950. She works as a linguist."],
                     qa=[QAItem(question="Where was Ana Ruiz born?", answer="Ana Ruiz was born in Lower Alder."),
                         QAItem(question="What is Ana Ruiz's job?", answer="Linguist.")])
    task = ForgetTask(name="t", targets=[t])
    sp = split_task(task, SplitConfig(seed=0, request_fraction=0.01))  # rounds to zero facts in the request
    assert len(sp.held_out["unseen_fact"]) == 2
    store = StoredTexts(system="detector", documents=t.texts)
    rep = parity_check(sp, [store])
    # The sentence answer is quoted by the biography; a one-word answer is not compared by containment.
    assert rep.overlaps == {"held_out:unseen_fact": {"detector": 1}}


def test_general_questions_never_reach_the_request(task) -> None:
    gq = GeneralItem(question=task.benign_questions[0], answer="100 degrees Celsius")
    sp = split_task(task, SplitConfig(seed=0), general=[gq])
    assert normalize(gq.question) not in _norm_set(sp.request.benign_questions)
    assert normalize(gq.question) not in _norm_set(sp.benign)
    assert sp.general == [gq]


def test_one_fact_targets_are_in_or_out_at_the_request_rate() -> None:
    targets = [ForgetTarget(id=f"p{i}", kind="privacy", names=[f"Person {i}"], policy="p",
                            qa=[QAItem(question=f"Who is the person number {i}?", answer=f"Person {i}")])
               for i in range(200)]
    sp = split_task(ForgetTask(name="t", targets=targets), SplitConfig(seed=0, request_fraction=0.5))
    assert 70 <= len(sp.in_request) <= 130
    assert len(sp.in_request) + len(sp.held_out["unseen_fact"]) == 200


FIXTURES = Path(__file__).parent / "fixtures"
SHARED_LUME = Path(__file__).resolve().parents[2] / "shared" / "data" / "lume"


def test_lume_fixture_sentence_completions_stay_in_the_request() -> None:
    from eval.tasks.lume import load_lume

    task = load_lume(FIXTURES / "lume")
    sp = split_task(task, SplitConfig(seed=0))
    assert all(q.kind != "verbmem" for q in sp.heldout_items())
    assert sum(q.kind == "verbmem" for q in sp.in_request) == len(task.targets)
    stores = [detector_texts(sp.request), request_texts(sp.request)]
    assert parity_check(exclude_overlaps(sp, stores), stores).total == 0


@pytest.mark.skipif(not SHARED_LUME.is_dir(), reason="needs ../shared/data/lume")
def test_lume_task3_split_by_real_person() -> None:
    from eval.tasks.spec import load_task_spec

    task = load_task_spec(f"lume:task3@{SHARED_LUME}")
    sp = split_task(task, SplitConfig(seed=0))
    c = sp.counts()
    # About half the real people's questions are held out; their people stay in the request by name and text.
    assert c["request"]["targets"] == 373 and 150 <= c["held_out"]["unseen_fact"] <= 220
    # 373 completions are always in the request; an unseen question whose answer (a name) is a request
    # answer asks about stored knowledge and is kept apart.
    assert c["in_request"] - 373 + c["held_out"]["unseen_fact"] + c["rephrased_request_facts"]["unseen_fact"] == 373
    assert c["people"]["retain"]["request"] + c["people"]["retain"]["evaluation"] == 371
    held = {q.subject for q in sp.negatives["retain"]}
    assert not held & {q.subject for q in sp.request.retain_qa}
    stores = [detector_texts(sp.request), request_texts(sp.request)]
    assert parity_check(exclude_overlaps(sp, stores), stores).total == 0
