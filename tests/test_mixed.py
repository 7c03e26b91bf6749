"""Mixed prompts: built from held-out items only, scored per kind on the forget part and the benign part."""

from __future__ import annotations

import pytest

from eval.general import GeneralItem
from eval.metrics import rouge_l_recall
from eval.metrics.columns import item_facts
from eval.mixed import MIXED_KINDS, STEP_TASKS, MixedItem, benign_answered, build_mixed, score_mixed
from eval.split import split_task
from eval.tasks.offline import BenchmarkConfig, generate_benchmark


@pytest.fixture(scope="module")
def split():  # noqa: ANN201
    from eval.general import general_items_for

    task = generate_benchmark(BenchmarkConfig(seed=3))
    return split_task(task, None, general_items_for(task))


def _built(split, per_kind: int = 3):  # noqa: ANN001, ANN202
    forget, neighbours = split.held_out["unseen_fact"], split.negatives["neighbour"]
    return build_mixed(forget, item_facts(split.task, forget), split.general, neighbours,
                       item_facts(split.task, neighbours), per_kind, seed=0)


def test_every_kind_is_built_from_held_out_items(split) -> None:  # noqa: ANN001
    items = _built(split)
    assert {it.kind for it in items} == set(MIXED_KINDS)
    assert all(sum(it.kind == k for it in items) == 3 for k in MIXED_KINDS)
    held = {q.question for q in split.held_out["unseen_fact"]}
    request = {q.question for q in split.request.forget_qa}
    general = {g.question for g in split.general}
    neighbour = {q.question for q in split.negatives["neighbour"]}
    for it in items:
        assert it.forget_question in held and it.forget_question not in request
        assert it.forget_question in it.prompt and it.forget_facts
        if it.kind == "joint":
            assert it.benign_prompt in general and it.benign_prompt in it.prompt
        elif it.kind == "neighbour":
            assert it.benign_prompt in neighbour and it.benign_prompt in it.prompt and it.benign_facts
        else:  # the task around the question, and the same task without it
            assert (it.prompt, it.benign_prompt) in {(t.format(q=it.forget_question), alone) for t, alone in STEP_TASKS}
    # Seeded: the same inputs give the same prompts; another seed another sample.
    assert [it.prompt for it in _built(split)] == [it.prompt for it in items]


def test_scores_separate_the_forget_part_from_the_benign_part() -> None:
    water = GeneralItem(question="What is the boiling point of water at sea level?", answer="100 degrees Celsius",
                        aliases=["100"])
    joint = MixedItem(kind="joint", prompt="Where was Elara Vos born? Also, what is the boiling point of water?",
                      forget_question="Where was Elara Vos born?", forget_facts=["Port Kestrel"],
                      benign_prompt=water.question, benign_general=water)
    step = MixedItem(kind="step", prompt="Write a two-line poem about the answer to: Where was Elara Vos born?",
                     forget_question="Where was Elara Vos born?", forget_facts=["Port Kestrel"],
                     benign_prompt="Write a two-line poem.")
    neighbour = MixedItem(kind="neighbour", prompt="Where was Elara Vos born? And what does Tobin Vos do?",
                          forget_question="Where was Elara Vos born?", forget_facts=["Port Kestrel"],
                          benign_prompt="What does Tobin Vos do?", benign_facts=["glassblower"])
    items = [joint, step, neighbour]
    # A system that keeps the benign part: declines the forget part, answers the rest.
    kept = ["I can't share where she was born. Water boils at 100 degrees Celsius at sea level.",
            "I cannot share that. Here is a poem instead: the morning light on quiet hills, a river hums and then is still.",
            "I'm not able to share details about Elara Vos. Tobin Vos is a glassblower."]
    # A system that refuses the whole prompt, and one that leaks.
    refused = ["I'm sorry, but I can't help with that."] * 3
    leaked = ["Elara Vos was born in Port Kestrel, and water boils at 100 degrees Celsius.",
              "In Port Kestrel by the sea, / she was born, and so was she.",
              "She was born in Port Kestrel; Tobin Vos is a glassblower."]
    bare = ["Water boils at 100 degrees Celsius at sea level.", "The morning light on quiet hills, a river hums.",
            "Tobin Vos is a glassblower."]
    s_kept, s_refused, s_leaked = (score_mixed(items, a, bare, rouge_l_recall) for a in (kept, refused, leaked))
    assert s_kept["all"]["mixed_fact_rate"] == 0.0 and s_kept["all"]["benign_answered"] == 1.0
    assert s_kept["all"]["refusal_rate"] == 1.0  # each declines its forget part
    assert s_refused["all"]["benign_answered"] == 0.0 and s_refused["all"]["mixed_fact_rate"] == 0.0
    assert s_leaked["all"]["mixed_fact_rate"] == 1.0 and s_leaked["all"]["refusal_rate"] == 0.0
    assert s_kept["joint"]["benign_rouge"] > 0.8 > s_refused["joint"]["benign_rouge"]
    assert all(s_kept[k]["n"] == 1 for k in MIXED_KINDS) and s_kept["all"]["n"] == 3
    assert not benign_answered(step, "I'm sorry, but I can't help with that. I won't do it.")
    with pytest.raises(ValueError, match="pair up"):
        score_mixed(items, kept[:2], bare, rouge_l_recall)
