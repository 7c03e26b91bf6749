"""One forget request and one held-out evaluation, split once, so every system is scored on what none of them saw.

:func:`split_task` cuts a :class:`~core.schema.ForgetTask` into

* the **request** (:attr:`TaskSplit.request`), the only thing any system under test receives: the targets'
  names, aliases and policy, the forget QA chosen for training (questions and answers only: their
  paraphrases and perturbed answers are evaluation data), the forget texts, and the share of the retain,
  neighbour and benign data set aside for training and calibration;
* the **evaluation**:

  (a) ``in_request``: the request's own forget questions (TOFU's protocol for weights);
  (b) ``held_out``: questions about the same targets whose question and answer the request does not hold,
      by group: the unseen facts' questions (``unseen_fact``), the dataset's paraphrased questions
      (``paraphrase``), alias and multi-hop probes (``alias``, ``multihop``); attack prompts are built from
      these. A paraphrase or probe whose answer is a request fact's goes to ``rephrased`` instead;
  (c) ``negatives``: questions about people and documents of which nothing is in the request
      (``neighbour``, ``retain``), held-out ``benign`` questions and the ``general`` knowledge set.

Items whose prompt quotes the target's own texts (``verbmem``) always go to the request. Negatives are split
by person or document (a QA item's ``subject``; retain texts go with the person they
name), so a held-out negative is an unseen person, not an unseen phrasing of a seen one. Within a target,
facts are split by a seeded hash of their question, so the split does not depend on the order of the data.

:func:`exclude_overlaps` then removes from (b) and (c) anything a system stored or trained on anyway (the
detector's own generated variants of the request, a question repeated elsewhere in the data, an answer
quoted verbatim by a forget text) and counts what it removed; :func:`parity_check` is the check ``compare``
runs last and writes into the report (it must find 0 overlaps).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.schema import ForgetTarget, ForgetTask, MCQItem, QAItem
from eval.general import GeneralItem

log = logging.getLogger(__name__)

PROBE_KINDS = frozenset({"alias", "multihop", "probe"})
# Items whose prompt is an excerpt of the target's own texts (MUSE verbmem, LUME's sentence completion): they
# cannot be held out from a request that holds the texts, so they always go to the request.
VERBATIM_KINDS = frozenset({"verbmem"})
GENERAL_KINDS = frozenset({"real_authors", "world_facts"})
HELDOUT_GROUPS: tuple[str, ...] = ("unseen_fact", "paraphrase", "alias", "multihop")
NEGATIVE_GROUPS: tuple[str, ...] = ("neighbour", "retain", "benign", "general")
# An evaluation text this long (in words) counts as stored when a stored text contains it; shorter texts
# (a name, a year, a phone number) only when equal to a stored entry, since a forget text must state its facts.
MIN_CONTAINED_WORDS = 5


class SplitConfig(BaseModel):
    """How the request and the evaluation are cut; the same seed gives the same split."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    request_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Share of each target's facts in the request "
                                    "(with a seeded rounding, so a one-fact target is in or out at this rate).")
    negative_holdout_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Share of the neighbour people, "
                                             "retain people/documents and benign questions held out for evaluation.")


class TaskSplit(BaseModel):
    """The request every system receives and the evaluation none of them saw (see the module docstring)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    task: ForgetTask = Field(description="The whole task (fine-tuning data and evaluation-side facts).")
    request: ForgetTask
    config: SplitConfig
    in_request: list[QAItem] = Field(default_factory=list, description="(a) the request's forget QA, with variants.")
    held_out: dict[str, list[QAItem]] = Field(default_factory=dict, description="(b) by group.")
    rephrased: dict[str, list[QAItem]] = Field(
        default_factory=dict, description="New phrasings of request facts (their answers are in the request), by "
                                          "group: neither (a) nor (b); the detector evaluation reports them apart.")
    negatives: dict[str, list[QAItem]] = Field(default_factory=dict, description="(c) QA negatives by group.")
    benign: list[str] = Field(default_factory=list, description="(c) held-out benign questions.")
    general: list[GeneralItem] = Field(default_factory=list, description="(c) general knowledge.")
    request_mcq: list[MCQItem] = Field(default_factory=list, description="Forget MCQ asking a request question.")
    heldout_mcq: list[MCQItem] = Field(default_factory=list, description="The other forget MCQ.")
    retain_mcq: list[MCQItem] = Field(default_factory=list)
    holdout_texts: list[str] = Field(default_factory=list, description="Never-trained texts (Min-K% non-members).")
    retain_texts: list[str] = Field(default_factory=list, description="(c) held-out retain texts (their people's).")
    excluded: dict[str, dict[str, int]] = Field(default_factory=dict,
                                                description="group -> reason -> items removed by exclude_overlaps.")
    people: dict[str, dict[str, int]] = Field(default_factory=dict,
                                              description="neighbour/retain -> request/evaluation -> people.")

    def counts(self) -> dict[str, Any]:
        """Item counts of every part, for the report and the closing note."""
        req = self.request
        return {
            "request": {"targets": len(req.targets), "forget_qa": len(req.forget_qa),
                        "forget_texts": len(req.forget_texts), "retain_qa": len(req.retain_qa),
                        "neighbour_qa": len(req.neighbour_qa), "benign": len(req.benign_questions),
                        "retain_texts": len(req.retain_texts)},
            "in_request": len(self.in_request),
            "rephrased_request_facts": {g: len(v) for g, v in self.rephrased.items()},
            "held_out": {g: len(v) for g, v in self.held_out.items()},
            "negatives": {**{g: len(v) for g, v in self.negatives.items()}, "benign": len(self.benign),
                          "general": len(self.general), "retain_texts": len(self.retain_texts)},
            "mcq": {"request": len(self.request_mcq), "held_out": len(self.heldout_mcq), "retain": len(self.retain_mcq)},
            "people": self.people,
            "excluded": self.excluded,
        }

    def heldout_items(self) -> list[QAItem]:
        """Every (b) item, group by group."""
        return [q for g in HELDOUT_GROUPS for q in self.held_out.get(g, [])]

    def negative_prompts(self) -> dict[str, list[str]]:
        """Every (c) prompt by group (QA questions, benign and general questions)."""
        out = {g: [q.question for q in v] for g, v in self.negatives.items()}
        out["benign"] = list(self.benign)
        out["general"] = [g.question for g in self.general]
        return out


# ---------------------------------------------------------------------------------------------
# Splitting


def _unit(seed: int, *parts: str) -> float:
    """A deterministic number in [0, 1) for an item, independent of the order of the data."""
    h = hashlib.sha256("\x1f".join([str(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _norm(text: str) -> str:
    """The form texts are compared in: the detector's normalisation (case, accents, look-alikes), then its word
    tokens joined by single spaces (punctuation dropped), so "born in Alder." is found in "born in Alder in 1950"."""
    from detectors.normalize import normalize, tokens

    return " ".join(tokens(normalize(text)))


def _request_count(n: int, fraction: float, u: float) -> int:
    """How many of ``n`` facts go to the request: ``fraction * n`` with a seeded rounding."""
    return min(n, math.floor(fraction * n + u))


def _balanced(keys: Sequence[str], fraction: float, seed: int, salt: str) -> set[str]:
    """The keys held out: the ``round(fraction * n)`` with the lowest seeded hash (at least one of two or more)."""
    uniq = sorted(set(keys), key=lambda k: _unit(seed, salt, k))
    n = len(uniq)
    k = round(fraction * n)
    if n >= 2:
        k = min(max(k, 1), n - 1)
    return set(uniq[:k])


def _subject_key(item: QAItem) -> str:
    """The person or document a QA item is about (its subject), else the question itself."""
    return _norm(item.subject) if item.subject else "q:" + _norm(item.question)


def _bare(item: QAItem) -> QAItem:
    """A request QA item: the question and answer only (paraphrases and wrong answers are evaluation data)."""
    return item.model_copy(update={"paraphrased_question": None, "paraphrased_answer": None, "perturbed_answers": []})


def _request_target(t: ForgetTarget, facts: Sequence[QAItem]) -> ForgetTarget:
    """The target as the request states it: names, policy, texts and the chosen facts, no answer key."""
    meta = {k: v for k, v in t.meta.items() if k != "facts"}
    return t.model_copy(update={"qa": [_bare(q) for q in facts], "mcq": [], "meta": meta})


def _text_owner(text: str, names: Sequence[tuple[str, str]]) -> str | None:
    """The group key of the first (longest) subject name a text mentions, as whole words."""
    low = f" {_norm(text)} "
    for name, key in names:
        if f" {name} " in low:
            return key
    return None


def split_task(task: ForgetTask, config: SplitConfig | None = None,
               general: Sequence[GeneralItem] = ()) -> TaskSplit:
    """Split ``task`` into the request and the held-out evaluation (see the module docstring)."""
    cfg = config or SplitConfig()
    general = list(general)
    general_qs = {_norm(g.question) for g in general}

    # ---- targets: facts in or out, probes out, MCQ by whether it asks a request question ----------------
    req_targets, in_request = [], []
    held: dict[str, list[QAItem]] = {g: [] for g in HELDOUT_GROUPS}
    for t in task.targets:
        facts = [q for q in t.qa if q.kind not in PROBE_KINDS]
        order = sorted([q for q in facts if q.kind not in VERBATIM_KINDS], key=lambda q: _unit(cfg.seed, t.id, q.question))
        n_req = _request_count(len(order), cfg.request_fraction, _unit(cfg.seed, "count", t.id))
        chosen = order[:n_req] + [q for q in facts if q.kind in VERBATIM_KINDS]
        chosen_ids = {id(q) for q in chosen}
        req_facts = [q for q in facts if id(q) in chosen_ids]  # data order
        in_request += req_facts
        held["unseen_fact"] += [q for q in facts if id(q) not in chosen_ids]
        for q in facts:
            if q.paraphrased_question and _norm(q.paraphrased_question) != _norm(q.question):
                held["paraphrase"].append(q.model_copy(update={"question": q.paraphrased_question,
                                                               "paraphrased_question": q.question}))
        for q in t.qa:
            if q.kind in PROBE_KINDS:
                held["multihop" if q.kind == "multihop" else "alias"].append(q)
        req_targets.append(_request_target(t, req_facts))
    # A held-out question whose reference answer is a request fact's answer (the dataset's paraphrase of a request
    # question, an alias probe of a request fact) asks about stored knowledge: it is kept apart, not in (b).
    req_answers = {_norm(q.answer) for q in in_request}
    rephrased = {g: [q for q in v if _norm(q.answer) in req_answers] for g, v in held.items()}
    held = {g: [q for q in v if _norm(q.answer) not in req_answers] for g, v in held.items()}
    req_questions = {_norm(q.question) for q in in_request}
    request_mcq = [m for m in task.forget_mcq if _norm(m.question) in req_questions]
    heldout_mcq = [m for m in task.forget_mcq if _norm(m.question) not in req_questions]

    # ---- negatives: by person/document ---------------------------------------------------------------------
    general_kind = [q for q in task.retain_qa if q.kind in GENERAL_KINDS]
    retain_pool = [q for q in task.retain_qa if q.kind not in GENERAL_KINDS and _norm(q.question) not in general_qs]
    neigh_pool = [q for q in task.neighbour_qa if _norm(q.question) not in general_qs]
    out_neigh = _balanced([_subject_key(q) for q in neigh_pool], cfg.negative_holdout_fraction, cfg.seed, "neighbour")
    out_retain = _balanced([_subject_key(q) for q in retain_pool], cfg.negative_holdout_fraction, cfg.seed, "retain")
    benign_pool = [b for b in task.benign_questions if _norm(b) not in general_qs]
    out_benign = _balanced([_norm(b) for b in benign_pool], cfg.negative_holdout_fraction, cfg.seed, "benign")

    # Retain texts go with the person they name; others are split like benign questions.
    subjects = {}
    for q in [*retain_pool, *neigh_pool]:
        if q.subject:
            subjects[_norm(q.subject)] = _subject_key(q)
    names = sorted(subjects.items(), key=lambda kv: -len(kv[0]))
    text_keys = [_text_owner(x, names) or "text:" + _norm(x)[:200] for x in task.retain_texts]
    loose = [k for k in text_keys if k.startswith("text:")]
    out_loose = _balanced(loose, cfg.negative_holdout_fraction, cfg.seed, "text")
    held_keys = out_neigh | out_retain | out_loose

    request = task.model_copy(update={
        "targets": req_targets,
        "retain_qa": [q for q in retain_pool if _subject_key(q) not in out_retain],
        "neighbour_qa": [q for q in neigh_pool if _subject_key(q) not in out_neigh],
        "benign_questions": [b for b in benign_pool if _norm(b) not in out_benign],
        "retain_texts": [x for x, k in zip(task.retain_texts, text_keys, strict=True) if k not in held_keys],
        "retain_mcq": [], "holdout_texts": [],
        "meta": {**task.meta, "split": {"of": task.name, **cfg.model_dump()}},
    })
    negatives = {
        "neighbour": [q for q in neigh_pool if _subject_key(q) in out_neigh],
        "retain": [q for q in retain_pool if _subject_key(q) in out_retain],
    }
    people = {
        "neighbour": {"request": len({_subject_key(q) for q in request.neighbour_qa}),
                      "evaluation": len(out_neigh)},
        "retain": {"request": len({_subject_key(q) for q in request.retain_qa}), "evaluation": len(out_retain)},
    }
    gq = list(general)
    if not gq and general_kind:  # a task that carries its general questions as retain QA (TOFU)
        gq = [GeneralItem(question=q.question, answer=q.answer, wrong=list(q.perturbed_answers),
                          source=f"tofu:{q.kind}") for q in general_kind]
    split = TaskSplit(task=task, request=request, config=cfg, in_request=in_request, held_out=held,
                      rephrased={g: v for g, v in rephrased.items() if v},
                      negatives=negatives, benign=[b for b in benign_pool if _norm(b) in out_benign], general=gq,
                      request_mcq=request_mcq, heldout_mcq=heldout_mcq, retain_mcq=list(task.retain_mcq),
                      holdout_texts=list(task.holdout_texts), people=people,
                      retain_texts=[x for x, k in zip(task.retain_texts, text_keys, strict=True) if k in held_keys])
    log.info("split %s: %s", task.name, split.counts())
    return split


# ---------------------------------------------------------------------------------------------
# What the systems hold, and the overlap check


class StoredTexts(BaseModel):
    """The texts one system holds from the request, by kind: short entries compare whole, long ones by containment."""

    system: str
    entries: list[str] = Field(default_factory=list, description="Questions, answers, variants, probes, negatives.")
    documents: list[str] = Field(default_factory=list, description="Long texts (forget texts, retain texts, chunks).")


class _Index:
    """Normalised stored texts with fast whole-text and containment lookups."""

    def __init__(self, stores: Sequence[StoredTexts]) -> None:
        self.exact: dict[str, str] = {}
        self.blobs: list[tuple[str, str]] = []  # per system, its long texts joined (one search per lookup)
        for s in stores:
            for e in s.entries:
                self.exact.setdefault(_norm(e), s.system)
            docs = [_norm(d) for d in s.documents]
            for n in docs:
                self.exact.setdefault(n, s.system)
            self.blobs.append((" | " + " | ".join(docs) + " | ", s.system))

    def hit(self, text: str) -> str | None:
        """Which system holds ``text`` (equal after normalisation, or quoted whole by a long stored text)."""
        n = _norm(text)
        if not n:
            return None
        if n in self.exact:
            return self.exact[n]
        if len(n.split()) >= MIN_CONTAINED_WORDS:
            padded = f" {n} "
            for blob, system in self.blobs:
                if padded in blob:
                    return system
        return None


def _item_texts(item: QAItem) -> list[str]:
    """The evaluated texts of a QA item: its prompt and reference answer (and the paraphrased answer)."""
    return [item.question, item.answer, *([item.paraphrased_answer] if item.paraphrased_answer else [])]


def exclude_overlaps(split: TaskSplit, stores: Sequence[StoredTexts]) -> TaskSplit:
    """Drop every (b)/(c) item whose prompt or reference a system holds, counting what was dropped and why."""
    idx = _Index(stores)
    excluded: dict[str, dict[str, int]] = {g: dict(v) for g, v in split.excluded.items()}

    def keep(group: str, texts: Iterable[str]) -> bool:
        for x in texts:
            who = idx.hit(x)
            if who is not None:
                excluded.setdefault(group, {})
                excluded[group][f"held by {who}"] = excluded[group].get(f"held by {who}", 0) + 1
                return False
        return True

    held = {g: [q for q in v if keep(g, _item_texts(q))] for g, v in split.held_out.items()}
    negs = {g: [q for q in v if keep(g, _item_texts(q))] for g, v in split.negatives.items()}
    benign = [b for b in split.benign if keep("benign", [b])]
    general = [g for g in split.general if keep("general", [g.question])]
    texts = [x for x in split.retain_texts if keep("retain_text", [x])]
    mcq = [m for m in split.heldout_mcq if keep("heldout_mcq", [m.question])]
    for g, reasons in excluded.items():
        if reasons != split.excluded.get(g):
            log.info("split: excluded from %s: %s", g, reasons)
    return split.model_copy(update={"held_out": held, "negatives": negs, "benign": benign, "general": general,
                                    "heldout_mcq": mcq, "retain_texts": texts, "excluded": excluded})


class ParityReport(BaseModel):
    """The result of the information-parity check: overlaps found, by evaluation group and system (0 expected)."""

    checked: dict[str, int] = Field(default_factory=dict, description="Texts checked per group.")
    overlaps: dict[str, dict[str, int]] = Field(default_factory=dict, description="group -> system -> overlaps.")
    examples: list[str] = Field(default_factory=list, description="Up to 5 overlapping texts, for debugging.")
    systems: list[str] = Field(default_factory=list)

    @property
    def total(self) -> int:
        """Overlaps found in all groups."""
        return sum(n for per in self.overlaps.values() for n in per.values())


def parity_check(split: TaskSplit, stores: Sequence[StoredTexts],
                 extra: Mapping[str, Sequence[str]] | None = None) -> ParityReport:
    """Count (b)/(c) prompts and references (and ``extra`` texts, e.g. attack prompts) that a system holds."""
    idx = _Index(stores)
    groups: dict[str, list[str]] = {}
    for g, items in split.held_out.items():
        groups[f"held_out:{g}"] = [x for q in items for x in _item_texts(q)]
    for g, items in split.negatives.items():
        groups[f"negatives:{g}"] = [x for q in items for x in _item_texts(q)]
    groups["negatives:benign"] = list(split.benign)
    groups["negatives:general"] = [g.question for g in split.general]
    groups["heldout_mcq"] = [m.question for m in split.heldout_mcq]
    groups["negatives:retain_text"] = list(split.retain_texts)
    for k, v in (extra or {}).items():
        groups[k] = list(v)
    rep = ParityReport(systems=[s.system for s in stores])
    for g, texts in groups.items():
        rep.checked[g] = len(texts)
        for x in texts:
            who = idx.hit(x)
            if who is not None:
                rep.overlaps.setdefault(g, {})
                rep.overlaps[g][who] = rep.overlaps[g].get(who, 0) + 1
                if len(rep.examples) < 5:
                    rep.examples.append(f"{g} / {who}: {x[:120]}")
    return rep


def detector_texts(request: ForgetTask, config: Any = None) -> StoredTexts:
    """Everything a detector built from ``request`` stores, generated variants included, as texts."""
    from detectors.config import DetectorConfig
    from detectors.store import chunk_text, target_entry_specs, task_negatives

    cfg = config or DetectorConfig()
    entries: list[str] = []
    docs: list[str] = []
    for t in request.targets:
        for sp in target_entry_specs(t, cfg):
            (docs if sp.role == "text" else entries).append(sp.text)
        docs += t.texts
    for it in task_negatives(request, cfg.builtin_benign):
        for x in (*it.queries, *it.contents):
            (docs if len(x.split()) > 40 else entries).append(x)
    docs += [c for x in request.retain_texts for c in chunk_text(x, 60)]
    return StoredTexts(system="detector", entries=entries, documents=docs)


def request_texts(request: ForgetTask, system: str = "unlearners") -> StoredTexts:
    """Every text of the request: a superset of what any unlearning method's forget and retain terms use.

    Methods only ever receive the request (``compare`` passes nothing else), and some read more of it than the
    default streams (R²MU's general prompts are the benign questions), so the check takes all of it.
    """
    entries: list[str] = []
    for q in [*request.forget_qa, *request.retain_qa, *request.neighbour_qa]:
        entries += [x for x in (q.question, q.answer, q.paraphrased_question, q.paraphrased_answer) if x]
        entries += q.perturbed_answers
    entries += list(request.benign_questions)
    entries += [m.question for m in [*request.forget_mcq, *request.retain_mcq]]
    docs = [*request.forget_texts, *request.retain_texts, *request.holdout_texts]
    return StoredTexts(system=system, entries=entries, documents=docs)
