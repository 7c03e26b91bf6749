"""The offline benchmark: deterministic, well-formed, sized as promised, neighbours really close."""

from __future__ import annotations

import hashlib

import pytest

from core.schema import load_task, save_task
from eval.tasks.offline import BenchmarkConfig, generate_benchmark, retain_training_qa, training_qa


def _digest(task) -> str:
    return hashlib.sha256(task.model_dump_json().encode()).hexdigest()


def test_same_seed_same_task_different_seed_differs():
    assert _digest(generate_benchmark(BenchmarkConfig(seed=5))) == _digest(generate_benchmark(BenchmarkConfig(seed=5)))
    assert _digest(generate_benchmark(BenchmarkConfig(seed=5))) != _digest(generate_benchmark(BenchmarkConfig(seed=6)))


def test_default_world_shape():
    task = generate_benchmark()
    people = [t for t in task.targets if t.kind == "privacy"]
    assert len(people) == 2  # 10% of 20
    assert len(task.meta["retain_people"]) + len(task.meta["neighbour_people"]) == 18
    for t in people:
        facts = [q for q in t.qa if q.kind == "fact"]
        assert 8 <= len(facts) <= 12
        for q in facts:
            assert q.paraphrased_question and q.paraphrased_question != q.question
            assert q.paraphrased_answer and len(q.perturbed_answers) >= 3
            assert q.answer not in q.perturbed_answers
            assert t.name in q.question
        assert {q.kind for q in t.qa} == {"fact", "alias", "multihop"}
        assert len(t.names) == 2
    hazard = task.target("hazard-quillon")
    assert hazard.kind == "hazard" and len(hazard.mcq) == 12
    assert all(len(m.choices) == 4 for m in hazard.mcq)
    assert len(task.retain_mcq) == 12 and len(task.benign_questions) >= 50 and len(task.holdout_texts) == 10
    # Four neighbours per forget person, so held-out neighbours are people, on both sides of the split.
    assert len(task.meta["neighbour_people"]) == 8 and len(task.meta["retain_people"]) == 10


def test_alias_probes_use_the_phrasing_no_fact_question_uses():
    task = generate_benchmark()
    for t in (x for x in task.targets if x.kind == "privacy"):
        alias = t.names[1]
        asked = {q.question.replace(t.name, alias) for q in t.qa if q.kind == "fact"}
        asked |= {q.paraphrased_question.replace(t.name, alias) for q in t.qa if q.kind == "fact"}
        probes = [q.question for q in t.qa if q.kind == "alias"]
        assert len(probes) == 3 and not set(probes) & asked


def test_neighbours_share_attributes_with_forget_people():
    task = generate_benchmark()
    forget_names = [t.name for t in task.targets if t.kind == "privacy"]
    surnames = {n.split()[1] for n in forget_names}
    firsts = {n.split()[0] for n in forget_names}
    nb = task.meta["neighbour_people"]
    assert any(n.split()[1] in surnames for n in nb)
    assert all(n not in forget_names for n in nb)
    shared = [q for q in task.neighbour_qa if "birth_place+profession" in q.kind]
    assert shared
    forget_places = {t.meta["facts"]["birth_place"] for t in task.targets if t.kind == "privacy"}
    assert any(p in q.answer for q in shared for p in forget_places)
    assert firsts  # first-name neighbours appear once there are 3+ neighbours per person


def test_retain_training_excludes_forget_facts():
    task = generate_benchmark()
    forget_answers = {q.answer for q in task.forget_qa}
    assert not forget_answers & {q.answer for q in retain_training_qa(task)}
    assert forget_answers & {q.answer for q in training_qa(task)}
    assert all(q.kind != "alias" and q.kind != "multihop" for q in training_qa(task))


@pytest.mark.parametrize("n", [20, 40])
def test_sizes_and_file_round_trip(tmp_path, n):
    task = generate_benchmark(BenchmarkConfig(num_people=n, seed=1))
    assert len([t for t in task.targets if t.kind == "privacy"]) == round(n * 0.1)
    assert load_task(save_task(task, tmp_path / "b.jsonl")) == task


def test_too_small_world_is_rejected():
    with pytest.raises(ValueError, match="raise num_people"):
        generate_benchmark(BenchmarkConfig(num_people=4, forget_fraction=0.5))
