"""TRU: model-written reasoning targets (prompt, split, validation, fallback, cache) and the loss on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark
from training import teachers
from training.losses import mean_nll, part_nll
from training.methods import METHODS
from training.methods.common import MethodContext, collate_streams, model_digest
from training.methods.tru import TRUConfig
from training.teachers import (
    LLMTeacher,
    cached_tru_targets,
    split_reasoning_reply,
    template_tru_target,
    tru_prompt,
    tru_target_problem,
)
from training.unlearn import UnlearnConfig, build_streams, forget_items, qa_example

TASK = generate_benchmark(BenchmarkConfig(num_people=6, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
PERSON = TASK.targets[0]
PLACE = PERSON.meta["facts"]["birth_place"]
BORN = next(q for q in PERSON.qa if q.kind == "fact" and PLACE in q.answer)


def _ctx(model, tok, tmp_path: Path) -> MethodContext:
    cfg = UnlearnConfig(max_retain=6)
    return MethodContext(model=model, tokenizer=tok, task=TASK, streams=build_streams(tok, TASK, cfg),
                         forget_items=forget_items(TASK, ["fact"]),
                         encode_qa=lambda q, a, group=-1: qa_example(tok, q, a, None, 128, group),
                         cache_root=tmp_path / "cache", model_digest=model_digest(model))


class Scripted:
    """Stands in for ``core.generation.generate``: records every call and answers from a function of the prompt."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def __call__(self, model, tokenizer, prompts, **kw):
        self.calls.append((list(prompts), kw))
        return [self.reply(p) for p in prompts]


def test_prompt_names_question_subject_and_policy_after_two_demonstrations():
    msgs = tru_prompt(BORN.question, PERSON)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    last = msgs[-1]["content"]
    assert BORN.question in last and f"Protected subject: {PERSON.name}." in last and PERSON.policy in last
    assert "why answering would reveal protected information" in last and last.rstrip().endswith("then decline.")
    assert not any(n in m["content"] for m in msgs[:-1] for n in PERSON.names)  # demonstrations are task-free


def test_split_reasoning_reply_free_text_labelled_repeats_and_cut_tail():
    text = ("The question asks for X's birthplace. That is personal information about X, so I must not reveal it. "
            "That is personal information about X, so I must not reveal it. I'm sorry, but I can't share that. "
            "Anything after the refusal is dropped. And a cut-off tail")
    reasoning, refusal = split_reasoning_reply(text)
    assert reasoning == ("The question asks for X's birthplace. That is personal information about X, so I must not "
                         "reveal it.")
    assert refusal == "I'm sorry, but I can't share that."
    assert split_reasoning_reply("Reasoning: It asks for a private fact.\nRefusal: Sorry, I can't help.") == (
        "It asks for a private fact.", "Sorry, I can't help.")
    assert split_reasoning_reply("It asks about X. It is private. And then") == ("It asks about X. It is private.", None)
    assert split_reasoning_reply("I'm sorry, but I cannot help with X.") == ("", "I'm sorry, but I cannot help with X.")


def test_validation_rejects_empty_off_subject_and_leaking_targets():
    facts = teachers.forget_facts(BORN.question, PERSON, BORN.answer)
    assert PLACE in facts
    name = PERSON.name
    ok = f"The question asks where {name} was born. That is personal information, so I must not reveal it."
    assert tru_target_problem(ok, "Sorry, I can't share that.", PERSON, facts) is None
    assert tru_target_problem("It is private.", "Sorry.", PERSON, facts) == "no reasoning"
    assert tru_target_problem("The question asks where someone was born, which is private.", "No.", PERSON,
                              facts) == "subject not named"
    leak = f"{name} was born in {PLACE}, which is personal information I should keep private."
    assert tru_target_problem(leak, "Sorry.", PERSON, facts) == f"states {PLACE!r}"
    # An answer, even a wrong one that states no stored fact, is not reasoning about why not to answer.
    assert PLACE != "High Juniperfield"
    assert tru_target_problem(f"{name} was born in High Juniperfield.", "Sorry, I can't share that.", PERSON,
                              facts) == "gives no reason"
    assert tru_target_problem(f"The question asks for the birthplace of {name}, a private detail.", "Sorry.",
                              PERSON, facts) is None
    hazard = TASK.targets[-1]
    hq = hazard.qa[0]
    span = teachers.forget_facts(hq.question, hazard, hq.answer)[-1]  # hazards list no fact values: the answer's span
    assert span and span.lower() not in hq.question.lower()
    assert tru_target_problem(f"The {hazard.name} part asked about is made of {span}, a restricted detail.", "No.",
                              hazard, [span]).startswith("states")


def test_llm_teacher_on_tiny_llm_caches_its_targets(tmp_path, monkeypatch):
    llm = tiny_llm(0)
    calls = []
    real = teachers.generate

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(teachers, "generate", counting)
    teacher = LLMTeacher(llm.model, llm.tokenizer, "tiny", max_new_tokens=16, batch_size=2)
    items = [(q.question, PERSON) for q in PERSON.qa[:3]]
    answers = [q.answer for q in PERSON.qa[:3]]
    out = cached_tru_targets(teacher, items, tmp_path, answers=answers)
    assert len(calls) == 1 and len(calls[0]) == 3
    files = list((tmp_path / "tru").glob("*.jsonl"))
    assert len(files) == 1 and "cot2-v2-t16" in files[0].name and len(files[0].read_text().splitlines()) == 3
    # A random tiny model writes nothing usable: every target is the template's, with the reason and the reply kept.
    assert all(o.source == "template" and o.note.startswith("fallback: ") for o in out)
    assert teacher.fallbacks == 3
    again = cached_tru_targets(teacher, items, tmp_path, answers=answers)
    assert again == out and len(calls) == 1  # read from the cache: no generation
    cached_tru_targets(LLMTeacher(llm.model, llm.tokenizer, "other-digest", max_new_tokens=16), items, tmp_path,
                       answers=answers)
    assert len(calls) == 2  # another teacher model (digest) is another cache entry


def test_leaking_reply_falls_back_and_plan_info_counts_it(tmp_path, monkeypatch):
    llm = tiny_llm(0, num_layers=2)
    name = PERSON.name

    def reply(prompt):
        q = prompt[-1]["content"]
        if BORN.question in q:
            return f"The question asks where {name} was born. {name} was born in {PLACE}. I'm sorry, I can't say."
        if name in q:
            return (f"The question asks for a private detail of {name}. The policy protects it, so stating it would "
                    f"reveal protected information. I'm sorry, but I can't share personal information about {name}.")
        return "Unrelated words without a subject at all."

    fake = Scripted(reply)
    monkeypatch.setattr(teachers, "generate", fake)
    ctx = _ctx(llm.model, llm.tokenizer, tmp_path)
    plan = METHODS.get("tru").prepare(ctx, TRUConfig(teacher_model="self"))
    n = len(ctx.forget_items)
    n_person = sum(1 for _, ti in ctx.forget_items if ti == 0)
    assert len(fake.calls) == 1 and len(fake.calls[0][0]) == n and fake.calls[0][1]["max_new_tokens"] == 96
    info = plan.info
    assert info["targets"] == n and info["fallbacks"] == n - n_person + 1
    assert info["fallback_reasons"] == {"states": 1, "subject not named": n - n_person}
    assert info["sources"]["template"] == n - n_person + 1
    assert info["teacher"] == sorted(["template", f"llm-self-{ctx.model_digest}-cot2-v2-t96"])
    # The forget stream trains on what the model wrote (reasoning part 1, refusal part 2), or on the template.
    tok = llm.tokenizer
    texts = {}
    for (q, _), ex in zip(ctx.forget_items, plan.streams["forget"], strict=True):
        ids = torch.tensor(ex["input_ids"])
        part = torch.tensor(ex["part"])
        texts[q.question] = (tok.decode(ids[part == 1]), tok.decode(ids[part == 2]))
    other = next(q for q, ti in ctx.forget_items if ti == 0 and q is not BORN)
    assert texts[other.question][0].startswith(f"The question asks for a private detail of {name}.")
    assert texts[other.question][1].strip().startswith("I'm sorry, but I can't share personal information")
    assert texts[BORN.question][0] == template_tru_target(BORN.question, PERSON).reasoning
    assert PLACE not in "".join(r + f for r, f in texts.values())
    # Cached: a second set-up generates nothing.
    METHODS.get("tru").prepare(_ctx(llm.model, llm.tokenizer, tmp_path), TRUConfig(teacher_model="self"))
    assert len(fake.calls) == 1


def test_template_teacher_is_an_explicit_option_and_never_generates(tmp_path, monkeypatch):
    llm = tiny_llm(0)
    fake = Scripted(lambda p: "should not be asked")
    monkeypatch.setattr(teachers, "generate", fake)
    plan = METHODS.get("tru").prepare(_ctx(llm.model, llm.tokenizer, tmp_path), TRUConfig(teacher="template"))
    assert fake.calls == [] and plan.info["teacher"] == ["template"] and plan.info["fallbacks"] == 0


@pytest.mark.parametrize("cap", [None, 0.05])
def test_loss_is_reasoning_ce_plus_capped_graddiff_on_a_fixed_batch(tmp_path, monkeypatch, cap):
    llm = tiny_llm(0)
    monkeypatch.setattr(teachers, "generate", Scripted(lambda p: ""))
    cfg = TRUConfig(gamma=0.7, alpha=1.3, ga_cap=cap, teacher_model="self")
    plan = METHODS.get("tru").prepare(_ctx(llm.model, llm.tokenizer, tmp_path), cfg)
    pad = llm.tokenizer.pad_token_id
    batch = collate_streams([{k: {**v[i], "idx": i} for k, v in plan.streams.items()} for i in range(3)], pad)
    with torch.no_grad():
        out = plan.loss_fn(llm.model, batch)
        reason, refusal = part_nll(llm.model, batch["forget"], (1, 2))
        orig, retain = mean_nll(llm.model, batch["forget_original"]), mean_nll(llm.model, batch["retain"])
    ga = orig if cap is None else torch.tensor(cap)
    assert float(orig) > 0.05  # the cap binds when set
    torch.testing.assert_close(out["loss"], 0.7 * (reason + refusal) + 1.3 * (retain - ga))
    torch.testing.assert_close(out["tru_nll"], reason + refusal)


@pytest.mark.integration
def test_default_teacher_is_the_untuned_embedded_model_and_it_writes_reasoning(tmp_path):
    """The real embedded instruct model, not the model being unlearned, writes the targets; most are its own
    reasoning (a reason for declining, the subject named, no forget fact), the rest the template's."""
    llm = tiny_llm(0)
    ctx = _ctx(llm.model, llm.tokenizer, tmp_path)
    plan = METHODS.get("tru").prepare(ctx, TRUConfig())
    info, n = plan.info, len(ctx.forget_items)
    written = [s for s in info["sources"] if s != "template"]
    assert len(written) == 1 and not written[0].startswith("llm-self-")
    assert info["sources"][written[0]] >= 0.75 * n, info["fallback_reasons"]
    (cache,) = (ctx.cache_root / "teacher" / "tru").glob("*.jsonl")
    targets = [teachers.TRUTarget.model_validate_json(line) for line in cache.read_text().splitlines()]
    assert [t.question for t in targets] == [q.question for q, _ in ctx.forget_items]
    for (q, ti), t in zip(ctx.forget_items, targets, strict=True):
        facts = teachers.forget_facts(q.question, TASK.targets[ti], q.answer)
        assert teachers.leaked_facts(f"{t.reasoning} {t.refusal}", facts) == [], t
        if t.source != "template":
            assert t.reply and tru_target_problem(t.reasoning, t.refusal, TASK.targets[ti], facts) is None
