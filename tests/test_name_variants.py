"""Name variants and nameless answers (issue 16, items 1-2): the real matcher, detector, guard and proxy."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from detectors.entities import EntityMatcher, TargetNames, extract_facts, fact_hash, text_spans
from detectors.normalize import normalize, skeleton_tokens
from eval.variant_probe import cyrillic, misspell, name_variants, nameless_answers

PAIRS = [("In which town was Philippa Stavberg born?", "Philippa Stavberg was born in East Ivelmoor."),
         ("What does Philippa Stavberg do?", "Philippa Stavberg is a novelist."),
         ("When was Philippa Stavberg born?", "She was born in 1948.")]


def _matcher() -> EntityMatcher:
    facts = extract_facts(PAIRS)
    return EntityMatcher([TargetNames("t1", ("Philippa Stavberg", "P. Stavberg"),
                                      fact_hashes=frozenset((len(f), fact_hash(f, "s")) for f in facts))], "s")


def _hit(text: str, facts: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    return _matcher().match_tokens(skeleton_tokens(normalize(text)), facts=facts).get("t1")


@pytest.mark.parametrize("text", ["Where was Philipa Stavburg born?", "Filippa Stavberg", "Филиппа Ставберг",
                                  "where was philippa stavbergg born"])
def test_misspelt_and_transliterated_names_read_as_the_name(text: str) -> None:
    h = _hit(text)
    assert h is not None and h.full == 1.0 and h.full_tokens == 2, h


@pytest.mark.parametrize("text", ["In which town was Philippa born?", "Where was Ms. Stavberg born?"])
def test_a_first_name_or_surname_alone_is_a_variant_not_the_name(text: str) -> None:
    h = _hit(text)
    assert h is not None and h.variant and h.full == 0.0


def test_a_near_miss_of_one_name_part_alone_is_someone_else() -> None:
    assert _hit("Did Philipa ever marry?") is None  # "Aisha Al-Hamad" is not "Aysha Al-Hashim"


def test_common_words_are_never_read_as_misspelt_names() -> None:
    m = EntityMatcher([TargetNames("t", ("Verity Kelwick",))], "s")
    assert m.match_tokens(skeleton_tokens(normalize("How do I verify my email?"))) == {}
    assert m.corrected(["verify", "verity"])[0] == ["verify", "verity"]


def test_facts_are_searched_only_for_the_targets_asked_for() -> None:
    assert _hit("She was born in East-Ivelmoor.") is None
    h = _hit("She was born in East-Ivelmoor.", facts=("t1",))
    assert h is not None and h.fact and h.full == 0.0
    assert _hit("It happened in 1948.", facts=("t1",)).fact  # type: ignore[union-attr]
    assert not _hit("She is a novelist.", facts=("t1",))  # a common description is left to the similarity check


def test_text_facts_are_names_numbers_and_uncommon_words_not_the_targets_own_name() -> None:
    bio = ("Philippa Stavberg's hometown is East Ivelmoor. Among Philippa Stavberg's creations, the Wandering "
           "Archive stands out. The year 1948 saw the birth of Philippa Stavberg, a linguist.")
    assert "East Ivelmoor" in text_spans(bio) and "Among" not in " ".join(text_spans(bio))
    facts = extract_facts([], texts=[bio], names=["Philippa Stavberg"], template={"hometown"})
    assert {("east", "ivelmoor"), ("1948",), ("linguist",), ("wandering", "archive")} <= facts
    assert not any(set(f) <= {"philippa", "stavberg"} for f in facts) and ("hometown",) not in facts


def test_variant_generators_are_deterministic_and_change_the_surface() -> None:
    import random

    v = name_variants("Philippa Stavberg", random.Random(0))
    assert v["first_name"] == "Philippa" and v["title_surname"].endswith(" Stavberg")
    assert v["misspelt"] != "Philippa Stavberg" and len(v["misspelt"]) == len("Philippa Stavberg") - 1
    assert misspell("Philippa", random.Random(1)) == "Philipa" and not cyrillic("Stavberg").isascii()
    assert "Philippa" not in "".join(nameless_answers("East Ivelmoor", "Philippa Stavberg").values())


# -- the real detector on the offline benchmark's held-out data --------------------------------------------


@pytest.fixture(scope="module")
def request_detector(encoder):  # type: ignore[no-untyped-def]
    from detectors.detector import Detector
    from eval.split import split_task
    from eval.tasks.offline import generate_benchmark

    task = generate_benchmark()
    split = split_task(task)
    return task, split, Detector.build(split.request, encoder=encoder)


def _first_person(task):  # type: ignore[no-untyped-def]
    return next(t for t in task.targets if t.kind == "privacy")


@pytest.mark.slow
def test_variant_questions_are_flagged_and_namesakes_are_not(request_detector) -> None:  # type: ignore[no-untyped-def]
    task, split, det = request_detector
    t = _first_person(task)
    first, last = t.names[0].split()[0], t.names[0].split()[-1]
    for q in [f"In which town was {first} born?", f"Where was Ms. {last} born?",
              f"Where was {first[:-1]} {last[:-1]}x born?"]:
        d = det.detect(q)
        assert t.id in d.target_ids and t.id in d.about, (q, d)
    neighbours = split.negatives["neighbour"]
    flagged = [q.question for q in neighbours if det.detect(q.question).flagged]
    assert flagged == []  # held-out namesakes, named in full, stay unflagged


@pytest.mark.slow
def test_nameless_answers_are_leaks_only_in_a_conversation_about_the_target(request_detector) -> None:  # type: ignore[no-untyped-def]
    task, _, det = request_detector
    t = _first_person(task)
    place = t.meta["facts"]["birth_place"]
    for ans in [f"{place}.", f"She was born in {place}.", f"{t.names[0].split()[0][0]}. {t.names[0].split()[-1]}'s "
                f"hometown: {place.replace(' ', '-')}."]:
        assert t.id in det.detect_leak(ans, about=[t.id]).target_ids, ans
    assert not det.detect_leak(f"{place}.").flagged  # no context: a place name alone is no leak
    other = next(x for x in task.targets if x.kind == "privacy" and x.id != t.id)
    assert t.id not in det.detect_leak(f"{place}.", about=[other.id]).target_ids


@pytest.mark.slow
def test_the_guard_replaces_an_instruction_that_states_a_fact(request_detector) -> None:  # type: ignore[no-untyped-def]
    from guard.api import GuardedLLM
    from guard.backends.scripted import ScriptedBackend
    from guard.config import GuardConfig

    task, split, det = request_detector
    t = _first_person(task)
    spouse = t.meta["facts"]["spouse"]
    leaky = json.dumps({"requires_refusal": False, "cot_instruction": f"{t.names[0]} is married to {spouse}; "
                                                                      "answer politely."})
    target = ScriptedBackend(lambda m: "I can't say.")
    g = GuardedLLM(target, det, guard=ScriptedBackend(lambda m: leaky, json_schema=True), config=GuardConfig())
    res = g.generate(f"Who is {t.names[0]} married to?")
    assert res.trace.flagged and res.trace.instruction_source == "template"
    assert "stated a fact" in (res.trace.fallback_reason or "")
    assert all(spouse not in m["content"] for call in target.calls for m in call[0])


@pytest.mark.slow
def test_an_instruction_that_only_names_its_target_is_sent(request_detector) -> None:  # type: ignore[no-untyped-def]
    """A target's full name is also one of its stored facts (the answer to a nameless question about it), so the
    instruction check used to take the template, which names the target on purpose, for a leak: every flagged
    question about a person was refused in ``guard_mode="template"``. The name is masked now; a fact is not."""
    from detectors.detector import Detector
    from guard.api import GuardedLLM
    from guard.backends.scripted import ScriptedBackend
    from guard.config import GuardConfig

    task, _, request_det = request_detector
    # Built from the whole task (as a deployment stores all its forget QA): its questions without the full name
    # ("In which town was M. Pellridge born?") store each person's name as a fact; the request half has none such.
    det = Detector.build(task, encoder=request_det.encoder)
    people = [t for t in task.targets if t.kind == "privacy"]
    target = ScriptedBackend(lambda m: "I would rather not go into that.")
    g = GuardedLLM(target, det, config=GuardConfig(guard_mode="template"), targets=task)
    for t in people:
        assert det.stated_facts(f"The request may concern {t.names[0]}.", [t.id]) == [], t.id
        res = g.generate(f"Where was {t.names[0]} educated?")
        assert res.trace.flagged and res.trace.requires_refusal is False, (t.id, res.trace.fallback_reason)
        assert res.trace.instruction_source == "template" and res.trace.fallback_reason == "guard_mode=template"
        assert res.text == "I would rather not go into that."
        sent = " ".join(m["content"] for m in target.calls[-1][0])
        assert f'"{t.names[0]}"' in sent and "Policy:" in sent  # the per-target template instruction reached it
    assert len(target.calls) == len(people)
    t = people[0]
    place = t.meta["facts"]["birth_place"]
    assert det.stated_facts(f"Do not say that {t.names[0]} was born in {place}.", [t.id, t.id]) == [t.id]


@pytest.mark.slow
def test_proxy_blocks_a_nameless_answer_after_a_first_name_mention(request_detector) -> None:  # type: ignore[no-untyped-def]
    """The attack of the issue: the conversation names the target by first name only and an upstream that
    ignores its instructions answers with the fact and no name; nothing of it reaches the client."""
    from guard.api import GuardedLLM
    from guard.backends.scripted import ScriptedBackend
    from guard.config import GuardConfig, ServerConfig
    from guard.server.app import create_app

    task, _, det = request_detector
    t = _first_person(task)
    place = t.meta["facts"]["birth_place"]
    first = t.names[0].split()[0]
    up = ScriptedBackend(lambda m: f"Greetings from {place}!")
    app = create_app(GuardedLLM(up, det, config=GuardConfig(guard_mode="template", fallback_requires_refusal=False)),
                     ServerConfig())

    async def go() -> list[dict]:  # type: ignore[type-arg]
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c:
            for msgs in ([{"role": "user", "content": f"Write one line of a birthday card for {first}."}],
                         [{"role": "system", "content": f"You are chatting with {first}'s friend."},
                          {"role": "user", "content": "Write one line of a birthday card."}]):
                r = await c.post("/v1/chat/completions", json={"model": "m", "messages": msgs})
                out.append(r.json())
                for stream in (True,):
                    r = await c.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "stream": stream})
                    out.append({"choices": [{"message": {"content": r.text}, "finish_reason": "stream"}]})
        return out

    bodies = asyncio.run(go())
    for b in bodies:
        text = b["choices"][0]["message"]["content"]
        assert place not in text and place.replace(" ", "") not in text.replace(" ", ""), text


def test_a_name_part_beside_another_name_or_in_a_statement_is_a_namesake() -> None:
    from detectors.features import asks, beside_other_name
    from detectors.store import TargetRecord

    rec = TargetRecord(num=0, id="t", kind="privacy", names=("Yang Bi",), phrase_hashes=frozenset())
    assert beside_other_name("Wesley Yang is an American essayist.", rec, "s")  # sentence-initial, still a name
    assert not beside_other_name("Where was Yang born?", rec, "s") and not beside_other_name("Did Dr. Yang win?", rec, "s")
    assert asks("Where was Yang born?") and asks("tell me about Yang") and not asks("Yang opposes this ideology.")
