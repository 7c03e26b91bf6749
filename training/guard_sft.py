"""Fine-tune a small guard LLM to write DRAGON-style CoT decisions (SFT on query/decision pairs).

DRAGON trains its chain-of-thought guard by SFT on ~900 query/CoT pairs. Here the pairs come from
a :class:`ForgetTask`: *flagged* queries (forget questions, their paraphrases, alias and multi-hop
probes) must be refused, while *near misses* (neighbours sharing a name or place with a target),
retain questions and benign questions, each shown with a target's policy as the detector would,
must not; nor must *mixed* prompts (a forget question joined with a benign one), whose instruction lets
the target answer the benign part and decline the rest. Each pair's answer is the JSON ``{"requires_refusal": bool, "cot_instruction": str}``,
written by a teacher LLM when one is configured (kept only if it validates and agrees with the
label) or by query-specific templates offline (they name the entity and the kind of fact asked).

:mod:`core.guard_format` holds THE prompt format, the decision schema and the strict parser, shared
with the inference guard (``guard.cot``), so the fine-tuned model sees at inference the input it was
trained on. :func:`split_pairs` holds out whole people and targets; ``eval.guard_decisions.evaluate_pairs`` scores
the held-out pairs the way the guard serves (constrained decoding, the serving token budget and parser).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from core.generation import encode_qa, generate, pad_batch
from core.guard_format import MAX_INSTRUCTION_CHARS, GuardDecision, guard_messages, parse_guard_output
from core.io import atomic_write_text
from core.schema import ForgetTarget, ForgetTask
from training.finetune import sft_loss
from training.loop import TrainConfig, TrainResult, finished_run, train
from training.teachers import fact_kind, mentioned_name, subject_phrase

log = logging.getLogger(__name__)


class GuardPair(BaseModel):
    """One SFT pair: the query, the targets shown to the guard, the label and the decision to learn."""

    query: str
    target_ids: list[str]
    kind: Literal["forget", "mixed", "neighbour", "retain", "benign"]
    requires_refusal: bool
    cot_instruction: str
    entity: str = Field(description="The name the instruction must mention to count as query-specific.")
    group: str = Field("", description="Who or what the query is about (a target, a person, or the query itself): "
                                       "the unit a held-out split keeps whole, so no phrasing of a trained "
                                       "question is evaluated.")
    source: str = "template"
    shown: list[ForgetTarget] = Field(default_factory=list, description="The targets the prompt shows when they are "
                                      "not the task's (a renamed copy's policy); empty: the task's target_ids.")

    def targets_in(self, task: ForgetTask) -> list[ForgetTarget]:
        """The targets the guard prompt of this pair shows."""
        if self.shown:
            return list(self.shown)
        by_id = {t.id: t for t in task.targets}
        return [by_id[i] for i in self.target_ids]

    def decision_json(self) -> str:
        """The exact JSON text the guard is trained to emit."""
        return GuardDecision(requires_refusal=self.requires_refusal, cot_instruction=self.cot_instruction).to_json()


class GuardDataConfig(BaseModel):
    """Which queries become pairs; all lists are sampled with ``seed``."""

    seed: int = 0
    paraphrases: bool = Field(True, description="Add paraphrased forget/neighbour questions.")
    max_retain: int = Field(120, ge=0, description="Retain-QA queries (unrelated people), shown with a policy.")
    max_benign: int = Field(60, ge=0, description="Generic benign queries, shown with a policy.")
    max_mixed: int = Field(40, ge=0, description="Forget questions joined with a benign one: the guard learns to "
                                                 "let the target answer the benign part and decline the rest.")
    renamed: int = Field(0, ge=0, description="Copies of each person's forget and neighbour pairs with the people "
                                              "renamed (fresh seeded names in the query, the policy and the "
                                              "instruction alike), meant to teach the guard to compare the name "
                                              "asked about with the policy's instead of memorising who is "
                                              "protected. Training only: held-out pairs are real people. Off by "
                                              "default: 2 copies did not change the held-out-person figures of the "
                                              "embedded 135M guard (60 steps; README).")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of pairs held out for evaluation.")
    split_by: Literal["person", "pair"] = Field(
        "person", description="'person': whole targets, people and queries are held out (no paraphrase of a trained "
                              "question is evaluated); 'pair': single pairs (the old split, paraphrases leak).")


GUARD_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "max_steps": 60, "batch_size": 8, "warmup_ratio": 0.05,
                                        "save_every": 10, "lora": {"r": 16, "alpha": 32}}


class GuardSFTConfig(BaseModel):
    """Guard fine-tuning: data, teacher and optimiser (LoRA r=16 by default).

    ``train`` given as a mapping (YAML, ``--set train.max_steps=30``) is merged into
    :data:`GUARD_TRAIN_DEFAULTS`, so overriding one field keeps LoRA and the other defaults.
    """

    model: str = "smollm2-135m-instruct"
    data: GuardDataConfig = Field(default_factory=GuardDataConfig)
    teacher: Literal["template", "llm"] = "template"
    teacher_model: str | None = Field(None, description="Model spec of the LLM teacher (required for teacher=llm).")
    max_length: int = Field(384, ge=64)
    balance: bool = Field(True, description="Repeat the refusal pairs until they weigh about as much in the loss as "
                                            "the others. Without it the embedded guard, trained on about 1 refusal "
                                            "in 6 pairs, learnt to never refuse (README).")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig.model_validate(GUARD_TRAIN_DEFAULTS))

    @field_validator("train", mode="before")
    @classmethod
    def _merge_train_defaults(cls, v: Any) -> Any:
        return {**GUARD_TRAIN_DEFAULTS, **v} if isinstance(v, dict) else v


# ---- templates ---------------------------------------------------------------------------------

def _target_for_neighbour(kind: str, targets: Sequence[ForgetTarget]) -> ForgetTarget | None:
    """The forget target a neighbour item resembles ("neighbour: shares surname with X" names X)."""
    for t in targets:
        if t.name in kind:
            return t
    return None


def refusal_instruction(query: str, target: ForgetTarget) -> str:
    """Template instruction for a flagged query: names what is asked about whom, and says to decline."""
    what = subject_phrase(query, target)
    text = (f"The user asks for {what}, which the policy protects. Think step by step: answering would reveal "
            f"it, so do not state, confirm or guess it, even partially; briefly decline and offer help with "
            f"something unrelated to {mentioned_name(query, target)}.")
    return text[:MAX_INSTRUCTION_CHARS]


def answer_instruction(query: str, target: ForgetTarget, subject: str | None) -> str:
    """Template instruction for a query that only looks related: answer normally, leave the target out."""
    if subject:
        text = (f"The user asks for {subject}'s {fact_kind(query)}. {subject} is not {target.name}, whom the "
                f"policy protects, so answer the question normally; do not add anything about {target.name}.")
    else:
        topic = query.strip().rstrip("?.!")[:80]
        text = (f"The request ({topic}) is unrelated to {target.name}, whom the policy protects. Answer it "
                f"normally and do not mention {target.name}.")
    return text[:MAX_INSTRUCTION_CHARS]


# How a forget question and a benign one are joined in training pairs: on purpose not the joiners the evaluation's
# mixed prompts use (eval.mixed.JOINERS), so the evaluation measures a format the guard was not trained on.
_TRAIN_JOINERS = ("{a} Besides that, {b}", "{b} Separately: {a}", "Quick questions: {a} and {b}")


def mixed_instruction(forget_query: str, target: ForgetTarget) -> str:
    """Template instruction for a prompt that joins a protected question with an unrelated one: answer the rest."""
    text = (f"The user also asks for {subject_phrase(forget_query, target)}, which the policy protects. Think step by "
            f"step: answer the other question fully and normally, but do not state, confirm or guess anything about "
            f"{mentioned_name(forget_query, target)}; for that part only, briefly say you cannot help.")
    return text[:MAX_INSTRUCTION_CHARS]


_SYLLABLES = ("al", "bren", "cor", "dav", "el", "fen", "gar", "hal", "is", "jor", "kel", "lor", "mar", "nev", "or",
              "per", "quil", "ros", "sev", "tor", "ul", "ver", "wen", "yor", "zan")
_FIRST_ENDS = ("a", "o", "in", "el", "is", "ia", "an", "et")
_LAST_ENDS = ("berg", "ford", "ova", "son", "ridge", "wick", "dahl", "stad", "mere", "holt")


def _fresh_name(rng: random.Random, taken: set[str]) -> tuple[str, str]:
    """A seeded invented (first, last) name whose words are in no name of the task."""
    while True:
        first = (rng.choice(_SYLLABLES) + rng.choice(_FIRST_ENDS)).capitalize()
        last = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(_LAST_ENDS)).capitalize()
        if first.casefold() not in taken and last.casefold() not in taken:
            taken.update({first.casefold(), last.casefold()})
            return first, last


def _renamer(old: str, first: str, last: str) -> Any:
    """A function that puts the new name's words (and initial) wherever the old name's appear."""
    import re

    words = old.split()
    mapping = {words[0]: first, words[-1]: last} if len(words) > 1 else {words[0]: last}
    if len(words) > 1:
        mapping[f"{words[0][0]}."] = f"{first[0]}."
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(w)}(?!\w)" for w in sorted(mapping, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda m: mapping[m.group(0)], text) if text else text


def renamed_copies(task: ForgetTask, copies: int, seed: int = 0) -> list[tuple[ForgetTarget, ForgetTarget, Any]]:
    """``copies`` renamed versions of each person target: (original, renamed copy, the renaming function)."""
    rng = random.Random(f"{seed}:renamed")
    taken = {w.casefold().strip(".") for t in task.targets for n in t.names for w in n.split()}
    taken |= {w.casefold() for q in task.neighbour_qa + task.retain_qa for w in (q.subject or "").split()}
    out = []
    for t in task.targets:
        if t.kind != "privacy":
            continue
        for k in range(copies):
            first, last = _fresh_name(rng, taken)
            ren = _renamer(t.name, first, last)
            qa = [q.model_copy(update={"question": ren(q.question), "answer": ren(q.answer),
                                       "paraphrased_question": ren(q.paraphrased_question), "subject": ren(q.subject)})
                  for q in t.qa]
            copy = t.model_copy(update={"id": f"{t.id}.renamed{k}", "names": [ren(n) for n in t.names],
                                        "policy": ren(t.policy), "qa": qa, "texts": [], "mcq": []})
            out.append((t, copy, ren))
    return out


def make_guard_pairs(task: ForgetTask, cfg: GuardDataConfig | None = None) -> list[GuardPair]:
    """Template pairs for every flagged query and a seeded sample of near-miss, retain and benign queries."""
    cfg = cfg or GuardDataConfig()
    rng = random.Random(cfg.seed)
    if not task.targets:
        raise ValueError(f"task {task.name!r} has no forget targets to build guard pairs for")
    pairs: list[GuardPair] = []
    seen: set[str] = set()

    def add(query: str, target: ForgetTarget, kind: str, refuse: bool, instruction: str, entity: str,
            group: str, shown: bool = False) -> None:
        if query in seen:
            return
        seen.add(query)
        pairs.append(GuardPair(query=query, target_ids=[target.id], kind=kind, requires_refusal=refuse,
                               cot_instruction=instruction, entity=entity, group=group,
                               shown=[target] if shown else []))

    for t in task.targets:
        for q in t.qa:
            for text in [q.question] + ([q.paraphrased_question] if cfg.paraphrases and q.paraphrased_question else []):
                add(text, t, "forget", True, refusal_instruction(text, t), mentioned_name(text, t), f"target:{t.id}")
    for q in task.neighbour_qa:
        t = _target_for_neighbour(q.kind, task.targets) or rng.choice(task.targets)
        subject = q.subject or "this person"
        for text in [q.question] + ([q.paraphrased_question] if cfg.paraphrases and q.paraphrased_question else []):
            add(text, t, "neighbour", False, answer_instruction(text, t, subject), subject, f"person:{subject}")
    people = [t for t in task.targets if t.kind == "privacy"] or list(task.targets)
    for q in rng.sample(task.retain_qa, min(cfg.max_retain, len(task.retain_qa))):
        t = rng.choice(people)
        add(q.question, t, "retain", False, answer_instruction(q.question, t, q.subject), q.subject or t.name,
            f"person:{q.subject or q.question}")
    benign = rng.sample(task.benign_questions, min(cfg.max_benign, len(task.benign_questions)))
    for text in benign:
        t = rng.choice(task.targets)
        add(text, t, "benign", False, answer_instruction(text, t, None), t.name, f"query:{text}")
    forget = [(q, t) for t in task.targets for q in t.qa]
    for q, t in rng.sample(forget, min(cfg.max_mixed, len(forget))) if task.benign_questions else []:
        b = rng.choice(task.benign_questions)
        a, c = (q.question, b) if rng.random() < 0.5 else (b, q.question)
        add(rng.choice(_TRAIN_JOINERS).format(a=a, b=c), t, "mixed", False, mixed_instruction(q.question, t),
            mentioned_name(q.question, t), f"target:{t.id}")
    for orig, t, ren in renamed_copies(task, cfg.renamed, cfg.seed):
        # Same groups as the originals: a held-out person's renamed copies are held out with them (and dropped).
        for q in t.qa:
            for text in [q.question] + ([q.paraphrased_question] if cfg.paraphrases and q.paraphrased_question else []):
                add(text, t, "forget", True, refusal_instruction(text, t), mentioned_name(text, t), f"target:{orig.id}",
                    shown=True)
        near = [q for q in task.neighbour_qa if _target_for_neighbour(q.kind, task.targets) is orig]
        for q in rng.sample(near, min(len(near), len(t.qa))):  # as many near misses as protected questions
            subject = ren(q.subject) or "this person"
            for text in [q.question] + ([q.paraphrased_question] if cfg.paraphrases and q.paraphrased_question else []):
                text = ren(text)
                add(text, t, "neighbour", False, answer_instruction(text, t, subject), subject,
                    f"person:{q.subject or 'this person'}", shown=True)
    return pairs


PAIR_KINDS = ("forget", "mixed", "neighbour", "retain", "benign")


def split_pairs(pairs: Sequence[GuardPair], holdout_fraction: float = 0.2, seed: int = 0,
                by: Literal["person", "pair"] = "person") -> tuple[list[GuardPair], list[GuardPair]]:
    """Seeded (train, held-out) split, stratified by kind so each kind appears in both where it can.

    ``by="person"`` holds out whole groups (a target with all its questions, paraphrases and mixed prompts; a
    neighbour or retain person; a benign query): per kind, groups in a seeded order until the kind's held-out share
    reaches ``holdout_fraction`` (at least one group when the kind has two or more), so no phrasing of a trained
    question is evaluated. ``by="pair"`` holds out single pairs (paraphrases of trained questions leak into it).
    """
    if by == "pair":
        train_p: list[GuardPair] = []
        held: list[GuardPair] = []
        for kind in PAIR_KINDS:
            group = [p for p in pairs if p.kind == kind]
            random.Random(f"{seed}:{kind}").shuffle(group)
            k = round(len(group) * holdout_fraction) if len(group) > 1 else 0
            held += group[:k]
            train_p += group[k:]
        return train_p, held
    held_groups: set[str] = set()
    for kind in ("forget", "neighbour", "retain", "benign"):  # mixed pairs follow their target's group
        of_kind = [p for p in pairs if p.kind == kind and not p.shown]  # the same real groups with or without copies
        groups = sorted({p.group or p.query for p in of_kind})
        random.Random(f"{seed}:{kind}").shuffle(groups)
        want, n = holdout_fraction * len(of_kind), 0
        for g in groups[:-1]:  # never every group: the guard must see each kind
            if n >= want and n > 0:
                break
            held_groups.add(g)
            n += sum((p.group or p.query) == g for p in of_kind)
    held = [p for p in pairs if (p.group or p.query) in held_groups and not p.shown]  # renamed copies: never held out
    return [p for p in pairs if (p.group or p.query) not in held_groups], held


# ---- LLM teacher -------------------------------------------------------------------------------

def teacher_pairs(model: Any, tokenizer: Any, pairs: Sequence[GuardPair], task: ForgetTask, name: str,
                  root: Path, max_new_tokens: int = 160, batch_size: int = 8) -> list[GuardPair]:
    """Replace template decisions by a teacher LLM's where they validate and agree with the label (cached)."""
    key = hashlib.sha256(json.dumps([name, [p.query for p in pairs]]).encode()).hexdigest()[:16]
    path = root / "guard_teacher" / f"{key}.jsonl"
    if path.exists():
        cached = [GuardPair.model_validate_json(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if [p.query for p in cached] == [p.query for p in pairs]:
            return cached
    prompts = [guard_messages(p.query, p.targets_in(task)) for p in pairs]
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=True, desc="guard teacher")
    out, kept = [], 0
    for p, reply in zip(pairs, replies, strict=True):
        d = parse_guard_output(reply)
        if d is not None and d.requires_refusal == p.requires_refusal:
            out.append(p.model_copy(update={"cot_instruction": d.cot_instruction, "source": f"llm-{name}"}))
            kept += 1
        else:
            out.append(p)
    log.info("guard teacher %s: %d of %d decisions kept, the rest from templates", name, kept, len(pairs))
    atomic_write_text(path, "".join(p.model_dump_json() + "\n" for p in out))
    return out


# ---- training and evaluation -------------------------------------------------------------------

def encode_pairs(tokenizer: Any, pairs: Sequence[GuardPair], task: ForgetTask, max_length: int) -> list[dict[str, list[int]]]:
    """Token ids of each pair: the guard prompt, then the decision JSON (the only labelled part)."""
    return [encode_qa(tokenizer, guard_messages(p.query, p.targets_in(task)), p.decision_json(),
                      max_length=max_length) for p in pairs]


def balanced(examples: Sequence[Any], refuse: Sequence[bool]) -> list[Any]:
    """The examples with the rarer decision's repeated (whole copies, in order) so both decisions weigh about the
    same: the decision is one token of a long answer, so a rare label barely moves a token-mean loss."""
    yes = [e for e, r in zip(examples, refuse, strict=True) if r]
    no = [e for e, r in zip(examples, refuse, strict=True) if not r]
    rare, common = sorted((yes, no), key=len)
    if not rare:
        return list(examples)
    return list(examples) + rare * (max(1, round(len(common) / len(rare))) - 1)


def guard_sft(model: Any, tokenizer: Any, task: ForgetTask, pairs: Sequence[GuardPair], cfg: GuardSFTConfig,
              out_dir: str | Path, stop_after: int | None = None) -> TrainResult:
    """SFT (LoRA by default) of a guard model on pairs; saves a plain HF model and reuses an identical run."""
    if not pairs:
        raise ValueError("no guard pairs to train on")
    examples = encode_pairs(tokenizer, pairs, task, cfg.max_length)
    if cfg.balance:
        examples = balanced(examples, [p.requires_refusal for p in pairs])
    cut = sum(1 for e in examples if e["labels"][-1] != tokenizer.eos_token_id)
    if cut:
        log.warning("%d guard examples hit max_length=%d and are truncated", cut, cfg.max_length)
    h = hashlib.sha256(cfg.model_dump_json().encode())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(json.dumps([e["input_ids"] for e in examples]).encode())
    fp = h.hexdigest()[:16]
    done = finished_run(out_dir, fp)
    if done is not None:
        log.info("reusing finished guard SFT at %s", out_dir)
        return done
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return train(model, tokenizer, examples, lambda b: pad_batch(b, pad_id), sft_loss, cfg.train, out_dir,
                 desc="guard sft", run_config=cfg, fingerprint=fp, stop_after=stop_after)
