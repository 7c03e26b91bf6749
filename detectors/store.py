"""The forget store: per-target names, key-phrase hashes and embeddings, updatable at run time.

Four vector banks, each a :class:`~detectors.index.VectorIndex` plus metadata rows aligned by id:

* ``query``: forget-side prompts: the task's questions and paraphrased questions, alias/multi-hop
  probes, code-generated variants ("Do you know ...", alias swaps, "Is it true that <answer>?")
  and name probes ("Who is X?");
* ``content``: forget answers, paraphrased answers and chunks of forget texts (for output checks);
* ``neg_query`` / ``neg_content``: the training share of the negatives (neighbour, retain and
  benign questions; retain answers and texts) used for the "nearest known negative" features.

A further held-out share of the negatives (never indexed) is kept for calibration. With
``keep_raw_text=False`` (the default) no forget question, answer or text is stored: only the
embeddings, the names and policy, and salted hashes of key phrases and of the words the target's
data uses (the latter tell a question about someone else apart). Salted hashes of short strings
can be recovered by guessing, so treat a saved detector as sensitive all the same.

Every update builds a new immutable :class:`StoreSnapshot` (copy-on-write) and swaps it in under a
lock; readers take the current snapshot without locking, so a request sees either the old or the
new store, never a half-updated one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from core.facts import target_fact_values
from core.schema import ForgetTarget, ForgetTask
from detectors.benign import builtin_benign_questions
from detectors.config import DetectorConfig
from detectors.encoder import Encoder
from detectors.entities import (
    EntityMatcher,
    TargetNames,
    birth_date_hash,
    birth_dates,
    extract_facts,
    extract_phrases,
    extract_values,
    fact_hash,
    name_tokens,
    phrase_hash,
    telling_tokens,
    value_hash,
)
from detectors.index import VectorIndex, index_options
from detectors.normalize import normalize, normalize_cased, proper_nouns, skeleton_tokens
from detectors.paraphrase import name_probes, phrase_probes, question_variants, statement_variants

log = logging.getLogger(__name__)

NEGATIVE_GROUPS: tuple[str, ...] = ("neighbour", "retain", "benign", "builtin_benign", "retain_text", "real_authors",
                                     "world_facts", "other")
ROLES: tuple[str, ...] = ("question", "paraphrase", "probe", "variant", "name_probe", "phrase_probe", "statement",
                          "answer", "text",
                          *(f"neg_{g}" for g in NEGATIVE_GROUPS),
                          "description")  # appended: saved role codes keep their meaning
ROLE_CODE: dict[str, int] = {r: i for i, r in enumerate(ROLES)}
PROBE_KINDS = frozenset({"alias", "multihop", "probe"})
QUESTION_ROLES = frozenset({"question", "paraphrase", "probe", "variant", "statement"})
"""Query entries whose exact text (after normalisation) is always flagged: see :func:`question_key`."""
_MIN_DESCRIPTION_WORDS = 6
_DESCRIPTION_BANKS = ("description", "query")
"""A description is searched by the similarity decision and is a neighbour in the classifier's features (the
classifier never trains on it as a positive: it is a statement, not a prompt)."""
ENT_WIDTH = 5  # stored entity features of an entry vs its own target: full, partial, phrase, foreign, other_name
BANKS: tuple[str, ...] = ("query", "content", "neg_query", "neg_content", "description")
FORGET_BANKS: tuple[str, ...] = ("query", "content", "description")
"""The banks built from the forget request (their texts are kept only with keep_raw_text)."""


class StoreError(ValueError):
    """A store update is invalid (duplicate or unknown target id, empty target)."""


@dataclass(frozen=True)
class TargetRecord:
    """What the store keeps about one target besides its vectors."""

    num: int
    id: str
    kind: str
    names: tuple[str, ...]
    phrase_hashes: frozenset[str]
    policy: str | None = None
    phrase_starts: frozenset[str] = frozenset()
    vocab: dict[str, frozenset[int]] = field(default_factory=dict)
    """Salted token hash -> groups whose texts use the token (-1: a name token, always explained)."""
    value_hashes: frozenset[tuple[int, str]] = frozenset()
    """(token count, salted hash) of the target's identifying values (e-mails, 6+ digit numbers)."""
    question_keys: frozenset[str] = frozenset()
    """Salted hashes of the stored forget questions (:func:`question_key`): an exact repeat is always flagged."""
    fact_hashes: frozenset[tuple[int, str]] = frozenset()
    """(token count, salted hash) of the target's facts (:func:`~detectors.entities.extract_facts`): stating one
    in a conversation about the target is a leak, named or not."""
    birth_hashes: frozenset[str] = frozenset()
    """Salted hashes of the birth dates its data states (:func:`~detectors.entities.birth_dates`, every reading)."""

    def name_token_set(self) -> frozenset[str]:
        """The matching tokens of all its names (what a namesake shares, what an instruction may name)."""
        return frozenset(t for n in self.names for t in name_tokens(n))

    def explains(self, token_hash: str, exclude_group: int | None = None) -> bool:
        """Whether the target's own data uses this token (outside ``exclude_group``)."""
        groups = self.vocab.get(token_hash)
        if not groups:
            return False
        return exclude_group is None or any(g != exclude_group for g in groups)


@dataclass(frozen=True)
class Bank:
    """A vector index with metadata rows sorted by ascending id."""

    index: VectorIndex
    ids: np.ndarray
    target: np.ndarray
    group: np.ndarray
    role: np.ndarray
    ent: np.ndarray
    texts: tuple[str | None, ...]
    caps: tuple[tuple[str, ...], ...]
    """Per row: salted hashes of the proper nouns of its text (for the foreign-name feature)."""

    @classmethod
    def empty(cls, dim: int, cfg: DetectorConfig) -> Bank:
        """A bank with no vectors."""
        return cls(VectorIndex(dim, **index_options(cfg)), np.zeros(0, np.int64), np.zeros(0, np.int32),
                   np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros((0, ENT_WIDTH), np.float32), (), ())

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of ``ids`` (-1 where the id is -1 or unknown)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids).clip(0, len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, pos, -1)

    def added(self, vectors: np.ndarray, ids: np.ndarray, target: np.ndarray, group: np.ndarray, role: np.ndarray,
              ent: np.ndarray, texts: Sequence[str | None], caps: Sequence[tuple[str, ...]]) -> Bank:
        """A new bank with rows appended (ids must exceed every stored id)."""
        if len(ids) == 0:
            return self
        if len(self.ids) and ids.min() <= self.ids.max():
            raise StoreError("new ids must be larger than stored ids")
        index = self.index.clone()
        index.add(vectors, ids)
        return Bank(index, np.concatenate([self.ids, ids]), np.concatenate([self.target, target]),
                    np.concatenate([self.group, group]), np.concatenate([self.role, role]),
                    np.concatenate([self.ent, ent]), self.texts + tuple(texts), self.caps + tuple(caps))

    def removed(self, keep: np.ndarray) -> Bank:
        """A new bank without the rows where ``keep`` is False."""
        if keep.all():
            return self
        index = self.index.clone()
        index.remove(self.ids[~keep])
        kept = np.flatnonzero(keep)
        return Bank(index, self.ids[keep], self.target[keep], self.group[keep], self.role[keep], self.ent[keep],
                    tuple(self.texts[i] for i in kept), tuple(self.caps[i] for i in kept))


@dataclass(frozen=True)
class NegativeItem:
    """One negative source item: its question phrasings, answers and the group it reports under."""

    group: str
    queries: tuple[str, ...] = ()
    contents: tuple[str, ...] = ()
    subject: str | None = None


@dataclass(frozen=True)
class CalibrationSet:
    """Held-out negatives (never indexed) for conformal calibration: vectors, texts (normalised, cased), groups,
    and the cluster (person, document or item) each text comes from, so composed prompts stay within one."""

    vectors: np.ndarray
    texts: tuple[str, ...]
    groups: tuple[str, ...]
    clusters: tuple[int, ...] = ()

    @classmethod
    def empty(cls, dim: int) -> CalibrationSet:
        """No calibration items."""
        return cls(np.zeros((0, dim), np.float32), (), (), ())


@dataclass(frozen=True)
class StoreSnapshot:
    """An immutable view of the whole store; detection reads one snapshot from start to end."""

    dim: int
    salt: str
    targets: dict[int, TargetRecord]
    num_of: dict[str, int]
    banks: dict[str, Bank]
    calib: dict[str, CalibrationSet]
    matcher: EntityMatcher
    neg_names: tuple[str, ...] = ()
    """Full names of people the negatives are about (retain/neighbour subjects): "someone else" evidence."""
    neg_matcher: EntityMatcher | None = None
    next_id: int = 1
    next_group: int = 1
    next_num: int = 0
    keep_raw_text: bool = False

    def target_id(self, num: int) -> str:
        """The id string of a target number."""
        return self.targets[num].id

    @cached_property
    def question_index(self) -> dict[str, tuple[int, ...]]:
        """Stored question key -> the targets that stored it (built once per snapshot)."""
        out: dict[str, list[int]] = {}
        for num, rec in self.targets.items():
            for k in rec.question_keys:
                out.setdefault(k, []).append(num)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def target_ids(self) -> list[str]:
        """Ids of the stored targets, in insertion order."""
        return [self.targets[n].id for n in sorted(self.targets)]


@dataclass
class _EntrySpec:
    """One text to embed for a target before it gets ids."""

    bank: str
    text: str
    role: str
    group_key: str
    ent: tuple[float, ...] = (0.0,) * ENT_WIDTH


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences on ., ! or ? followed by white space."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def chunk_text(text: str, max_words: int) -> list[str]:
    """Group sentences into chunks of at most ``max_words`` words (a long sentence stays whole)."""
    chunks: list[str] = []
    cur: list[str] = []
    n = 0
    for s in split_sentences(text):
        w = len(s.split())
        if cur and n + w > max_words:
            chunks.append(" ".join(cur))
            cur, n = [], 0
        cur.append(s)
        n += w
    if cur:
        chunks.append(" ".join(cur))
    return chunks


def question_key(text: str, salt: str) -> str:
    """Salted hash of a question's normalised tokens: equal for any casing, spacing, punctuation or homoglyphs."""
    return phrase_hash(("\x00question", *skeleton_tokens(normalize(text))), salt)


def mask_names(sentence: str, names: Sequence[str]) -> str:
    """A sentence with the target's names (whole, then any of their tokens) replaced by "this person"."""
    out = sentence
    toks = sorted({t for n in names for t in n.split() if len(t) >= 3}, key=len, reverse=True)
    for n in sorted(names, key=len, reverse=True) + toks:
        out = re.sub(rf"(?<!\w){re.escape(n)}(?!\w)", "this person", out, flags=re.IGNORECASE)
    return re.sub(r"(?:this person[\s,]*){2,}", "this person ", out).strip()


def text_sentences(text: str) -> list[str]:
    """The sentences of a text (line by line) long enough to describe someone: the description-sized units."""
    return [s for line in text.splitlines() for s in split_sentences(line) if len(s.split()) >= _MIN_DESCRIPTION_WORDS]


def description_sentences(texts: Sequence[str], names: Sequence[str]) -> list[str]:
    """Sentences of a target's forget texts with its names masked: a question that describes the target
    without naming it ("Who is the surgeon who separated three sets of twins?") is close to one of them."""
    return [mask_names(sent, names) for text in texts for sent in text_sentences(text)]


def target_entry_specs(target: ForgetTarget, cfg: DetectorConfig) -> list[_EntrySpec]:
    """Everything stored for one target: questions, variants, probes, answers and text chunks."""
    names = list(target.names)
    specs: list[_EntrySpec] = []
    for i, qa in enumerate(target.qa):
        g = f"qa{i}"
        if qa.kind in PROBE_KINDS:
            specs.append(_EntrySpec("query", qa.question, "probe", g))
        else:
            specs.append(_EntrySpec("query", qa.question, "question", g))
            specs.extend(_EntrySpec("query", v, "variant", g)
                         for v in question_variants(qa.question, names, cfg.paraphrase_frames, salt=i))
            if qa.paraphrased_question:
                specs.append(_EntrySpec("query", qa.paraphrased_question, "paraphrase", g))
            if cfg.statement_prompts:
                specs.extend(_EntrySpec("query", s, "statement", g) for s in statement_variants(qa.answer, salt=i))
        specs.append(_EntrySpec("content", qa.answer, "answer", g))
        if qa.paraphrased_answer:
            specs.append(_EntrySpec("content", qa.paraphrased_answer, "answer", g))
    if cfg.name_probes:
        specs.extend(_EntrySpec("query", p, "name_probe", "names") for p in name_probes(names))
        # Key phrases (quoted titles) of answers and texts that are not part of a name.
        in_names = extract_phrases(names)
        phrases = sorted(extract_phrases([*(q.answer for q in target.qa), *target.texts]) - in_names)
        specs.extend(_EntrySpec("query", p, "phrase_probe", f"phrase{i}")
                     for i, p in enumerate(phrase_probes([" ".join(toks) for toks in phrases])))
    for j, text in enumerate(target.texts):
        specs.extend(_EntrySpec("content", c, "text", f"text{j}") for c in chunk_text(text, cfg.text_chunk_words))
        if cfg.description_probes:
            specs.extend(_EntrySpec(bank, d, "description", f"text{j}")
                         for d in description_sentences([text], names) for bank in _DESCRIPTION_BANKS)
    if cfg.description_probes:  # what the answers say about the target, as descriptions too
        specs.extend(_EntrySpec(bank, d, "description", f"qa{i}") for i, qa in enumerate(target.qa)
                     for d in description_sentences([qa.answer], names) for bank in _DESCRIPTION_BANKS)
    if not any(s.bank == "query" for s in specs):
        raise StoreError(f"target {target.id!r} yields no query entries (no names, no QA)")
    # Deduplicate identical (bank, normalised text) pairs: keep the first.
    seen: set[tuple[str, str]] = set()
    out = []
    for s in specs:
        key = (s.bank, normalize(s.text))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


_TEMPLATE_SHARE = 0.5
_MIN_TEMPLATE_TEXTS = 20


def template_words(snap: StoreSnapshot) -> frozenset[str]:
    """Words that at least half of the stored negative texts use ("hometown", "career" in biographies): what texts
    of the kind say about anyone, so never a target's fact (none with fewer than 20 negative texts)."""
    bank = snap.banks.get("neg_content")
    if bank is None:
        return frozenset()
    role = ROLE_CODE.get("neg_retain_text")
    docs = [t for t, r in zip(bank.texts, bank.role, strict=True) if t and (role is None or r == role)]
    if len(docs) < _MIN_TEMPLATE_TEXTS:
        return frozenset()
    df: dict[str, int] = {}
    for d in docs:
        for tok in set(skeleton_tokens(normalize(d))):
            df[tok] = df.get(tok, 0) + 1
    return frozenset(t for t, n in df.items() if n >= _TEMPLATE_SHARE * len(docs))


def _meta_fact_values(target: ForgetTarget) -> list[str]:
    """A target's listed fact values (``meta['facts']``), or none when its meta holds no such list."""
    try:
        return target_fact_values(target)
    except (AttributeError, TypeError):
        return []


def caps_hashes(cased: str, salt: str) -> tuple[str, ...]:
    """Salted hashes of the proper nouns of a cased, normalised text."""
    return tuple(phrase_hash((tok,), salt) for tok in dict.fromkeys(proper_nouns(cased)))


def foreign_share(caps: Sequence[str], target: TargetRecord, exclude_group: int | None = None) -> float:
    """Share of a text's proper nouns that the target's data never uses (0 when there are none)."""
    if not caps:
        return 0.0
    return sum(not target.explains(h, exclude_group) for h in caps) / len(caps)


def _matcher(targets: Iterable[TargetRecord], salt: str) -> EntityMatcher:
    """The entity matcher over ``targets``."""
    return EntityMatcher([TargetNames(t.id, t.names, t.phrase_hashes, t.phrase_starts, t.value_hashes, t.fact_hashes)
                          for t in targets], salt)


def neg_name_matcher(names: Sequence[str], salt: str) -> EntityMatcher | None:
    """A matcher over the negatives' subject names (None when there are none)."""
    return EntityMatcher([TargetNames(f"neg{i}", (n,)) for i, n in enumerate(names)], salt) if names else None


def mentions_other(snap: StoreSnapshot, normalized: str, toks: list[str] | None = None,
                   leave_one_out: bool = False) -> float:
    """1.0 when the text names a known negative subject (a retain or neighbour person) in full.

    ``leave_one_out`` (a stored negative itself, in training): its own subject does not count, so it needs two
    named subjects; otherwise the classifier would learn from negatives that always name a known person, and
    trust the feature on unseen people, who never do.
    """
    if snap.neg_matcher is None:
        return 0.0
    hits = snap.neg_matcher.match_tokens(toks if toks is not None else skeleton_tokens(normalized))
    named = sum(1 for h in hits.values() if h.full)
    return 1.0 if named > (1 if leave_one_out else 0) else 0.0


def subject_names(items: Iterable[NegativeItem], forget_names: Iterable[str]) -> tuple[str, ...]:
    """Distinct multi-token subject names of negative items, minus any that is a forget target's name."""
    forget = {name_tokens(n) for n in forget_names}
    out = {it.subject.strip() for it in items if it.subject and len(name_tokens(it.subject)) >= 2}
    return tuple(sorted(n for n in out if name_tokens(n) not in forget))


def _item_hash(parts: Iterable[str], seed: int) -> float:
    """A deterministic number in [0, 1) for an item, so splits do not depend on order."""
    h = hashlib.sha256((str(seed) + "\x1f" + "\x1e".join(parts)).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _retain_group(kind: str) -> str:
    """Report group of a retain QA item: "retain" for facts, else its kind (e.g. TOFU's "real_authors")."""
    return "retain" if kind == "fact" else re.sub(r"[^a-z0-9_]+", "_", kind.lower()).strip("_") or "retain"


def task_negatives(task: ForgetTask, builtin: bool = True) -> list[NegativeItem]:
    """The negatives a task provides: neighbour and retain QA, retain texts, benign questions (+ built-in).

    A text that occurs in several places is kept once, in the first group that has it (neighbour,
    retain, retain texts, benign, built-in benign).
    """
    seen: set[str] = set()

    def fresh(texts: Iterable[str | None]) -> tuple[str, ...]:
        """The texts not seen before (by normalised form), marking them seen."""
        out = []
        for t in texts:
            if t and normalize(t) not in seen:
                seen.add(normalize(t))
                out.append(t)
        return tuple(out)

    items: list[NegativeItem] = []
    for qa in task.neighbour_qa:
        items.append(NegativeItem("neighbour", fresh((qa.question, qa.paraphrased_question)),
                                  fresh((qa.answer, qa.paraphrased_answer)), qa.subject))
    for qa in task.retain_qa:
        items.append(NegativeItem(_retain_group(qa.kind), fresh((qa.question, qa.paraphrased_question)),
                                  fresh((qa.answer, qa.paraphrased_answer)), qa.subject))
    for t in task.retain_texts:
        # Its sentences are negatives of the prompt channel too, the counterpart of the targets' descriptions.
        items.append(NegativeItem("retain_text", fresh(text_sentences(t)), fresh(chunk_text(t, 60)), _text_subject(t)))
    items.extend(NegativeItem("benign", fresh((q,))) for q in task.benign_questions)
    if builtin:
        items.extend(NegativeItem("builtin_benign", fresh((q,))) for q in builtin_benign_questions())
    return [it for it in items if it.queries or it.contents]


def _text_subject(text: str) -> str | None:
    """The subject of a document: its first line when that reads like a title (LUME and Wikipedia-style texts)."""
    first = text.strip().split("\n", 1)[0].strip()
    return first if first and len(first.split()) <= 8 and "\n" in text.strip() else None


def cluster_key(item: NegativeItem) -> tuple[str, ...]:
    """The unit the calibration split keeps whole: the item's subject (a person, a document), else the item."""
    if item.subject:
        return ("subject", normalize(item.subject))
    return (item.group, *item.queries, *item.contents)


def split_negatives(items: Sequence[NegativeItem], calib_fraction: float, seed: int,
                    max_per_group: int) -> tuple[list[NegativeItem], list[NegativeItem]]:
    """Split negative items into (train, calibration) by a seeded hash of their *cluster*; cap each group's size.

    Questions come in clusters (one person, one document): a split per item would put questions about one
    person on both sides, and a threshold calibrated on such items promises nothing about unseen people.
    Splitting by cluster makes the calibration items exchangeable with a new person's questions.
    """
    by_group: dict[str, list[tuple[float, NegativeItem]]] = {}
    for it in items:
        by_group.setdefault(it.group, []).append((_item_hash((it.group, *it.queries, *it.contents), seed), it))
    train, calib = [], []
    for g in sorted(by_group):
        ranked = sorted(by_group[g], key=lambda x: x[0])[:max_per_group]
        # One cluster only (a single retain document): split its items, as nothing else can be held out.
        whole = len({cluster_key(it) for _, it in ranked}) >= 2
        keys = [cluster_key(it) if whole else (str(h),) for h, it in ranked]
        u = [_item_hash(k, seed + 1) for k in keys]
        cut = calib_fraction
        if len(set(keys)) >= 2:  # a group of few clusters still puts one on each side
            cut = min(max(cut, float(np.nextafter(min(u), 1.0))), max(u))
        for (_, it), v in zip(ranked, u, strict=True):
            (calib if v < cut else train).append(it)
    return train, calib


class ForgetStore:
    """Thread-safe owner of the current :class:`StoreSnapshot`; updates are copy-on-write swaps."""

    def __init__(self, snapshot: StoreSnapshot, encoder: Encoder, config: DetectorConfig) -> None:
        """Wrap an existing snapshot (use :meth:`empty` or :meth:`from_task` to make one)."""
        self._snap = snapshot
        self.encoder = encoder
        self.config = config
        self._lock = threading.RLock()
        self._template: tuple[Bank | None, frozenset[str]] | None = None  # template words of one negative bank

    @classmethod
    def empty(cls, encoder: Encoder, config: DetectorConfig, salt: str | None = None) -> ForgetStore:
        """A store with no targets and no negatives."""
        dim = encoder.dim
        salt = salt or secrets.token_hex(16)
        snap = StoreSnapshot(dim=dim, salt=salt, targets={}, num_of={},
                             banks={b: Bank.empty(dim, config) for b in BANKS},
                             calib={"query": CalibrationSet.empty(dim), "content": CalibrationSet.empty(dim)},
                             matcher=_matcher([], salt), keep_raw_text=config.keep_raw_text)
        return cls(snap, encoder, config)

    @classmethod
    def from_task(cls, task: ForgetTask, encoder: Encoder, config: DetectorConfig,
                  negatives: Sequence[NegativeItem] | None = None) -> ForgetStore:
        """Build a store from a task's targets and negatives (the task's own, plus built-in benign)."""
        store = cls.empty(encoder, config)
        negs = list(negatives) if negatives is not None else task_negatives(task, config.builtin_benign)
        # Negatives first: a target's entries record whether they name a known negative subject.
        store.set_negatives(negs, memo=True, forget_names=[n for t in task.targets for n in t.names])
        store.add_targets(task.targets, memo=True)
        return store

    def snapshot(self) -> StoreSnapshot:
        """The current immutable snapshot (no lock needed: a reference read is atomic)."""
        return self._snap

    @property
    def target_ids(self) -> list[str]:
        """Ids of the stored targets."""
        return self._snap.target_ids

    # -- targets ----------------------------------------------------------------------------------
    def _prepare(self, targets: Sequence[ForgetTarget], snap: StoreSnapshot, memo: bool
                 ) -> tuple[list[TargetRecord], dict[str, tuple[Any, ...]], tuple[int, int, int]]:
        """Embed every entry of ``targets`` (one encoder call) and lay out their rows per bank."""
        cfg = self.config
        salt = snap.salt
        template = self._template_words(snap)
        records: list[TargetRecord] = []
        all_specs: list[tuple[int, _EntrySpec, int]] = []
        next_num, next_group = snap.next_num, snap.next_group
        for t in targets:
            # A description with nothing that singles anyone out ("The author's full name is this person.") fits
            # anyone: stored, it would flag every generic question and teach the classifier to.
            specs = [sp for sp in target_entry_specs(t, cfg)
                     if sp.role != "description" or telling_tokens(normalize_cased(sp.text), template)]
            group_id: dict[str, int] = {}
            for sp in specs:
                if sp.group_key not in group_id:
                    group_id[sp.group_key] = next_group
                    next_group += 1
            # Vocabulary: every token of the target's data, with the groups that use it.
            vocab: dict[str, set[int]] = {}
            for name in t.names:
                for tok in name_tokens(name):
                    vocab.setdefault(phrase_hash((tok,), salt), set()).add(-1)
            text_group = [(sp.text, group_id[sp.group_key]) for sp in specs]
            text_group += [(q, -2) for q in t.texts]  # whole texts: no group of their own (their chunks have one)
            for text, g in text_group:
                for tok in set(skeleton_tokens(normalize(text))):
                    vocab.setdefault(phrase_hash((tok,), salt), set()).add(g)
            phrases = extract_phrases([*t.names, *(q.answer for q in t.qa),
                                       *(q.paraphrased_answer for q in t.qa if q.paraphrased_answer), *t.texts])
            rec = TargetRecord(num=next_num, id=t.id, kind=t.kind, names=tuple(t.names),
                               phrase_hashes=frozenset(phrase_hash(p, salt) for p in phrases), policy=t.policy,
                               phrase_starts=frozenset(phrase_hash(p[:1], salt) for p in phrases),
                               vocab={h: frozenset(g) for h, g in vocab.items()},
                               value_hashes=frozenset((len(v), value_hash(v, salt)) for v in extract_values(
                                   [*(q.answer for q in t.qa), *(q.paraphrased_answer for q in t.qa
                                                                 if q.paraphrased_answer)], t.texts)),
                               question_keys=frozenset(question_key(sp.text, salt) for sp in specs
                                                       if sp.role in QUESTION_ROLES),
                               fact_hashes=frozenset((len(f), fact_hash(f, salt)) for f in extract_facts(
                                   [*((q.question, q.answer) for q in t.qa),
                                    *((q.paraphrased_question or q.question, q.paraphrased_answer) for q in t.qa
                                      if q.paraphrased_answer)], _meta_fact_values(t), t.texts, t.names, template)),
                               birth_hashes=frozenset(birth_date_hash(d, salt) for x in [
                                   *(s for q in t.qa for s in (q.question, q.answer, q.paraphrased_question,
                                                               q.paraphrased_answer) if s), *t.texts]
                                   for d in birth_dates(x)))
            next_num += 1
            records.append(rec)
            own = _matcher([rec], salt)
            for sp in specs:
                g = group_id[sp.group_key]
                hit = own.match(normalize(sp.text)).get(t.id)
                caps = caps_hashes(normalize_cased(sp.text), salt)
                sp.ent = ((hit.full, hit.partial, hit.phrase) if hit else (0.0, 0.0, 0.0)) + (
                    foreign_share(caps, rec, exclude_group=g), mentions_other(snap, normalize(sp.text)))
                all_specs.append((rec.num, sp, g))
        cased = [normalize_cased(sp.text) for _, sp, _ in all_specs]
        vecs = self.encoder.encode([normalize(c) for c in cased], memo=memo)
        next_id = snap.next_id
        ids = np.arange(next_id, next_id + len(all_specs), dtype=np.int64)
        per_bank: dict[str, list[int]] = {b: [] for b in FORGET_BANKS}
        for i, (_, sp, _) in enumerate(all_specs):
            per_bank[sp.bank].append(i)
        rows: dict[str, tuple[Any, ...]] = {}
        for b, idx in per_bank.items():
            ix = np.asarray(idx, dtype=np.int64)
            rows[b] = (vecs[ix] if len(ix) else np.zeros((0, snap.dim), np.float32),
                       ids[ix], np.array([all_specs[i][0] for i in idx], np.int32),
                       np.array([all_specs[i][2] for i in idx], np.int64),
                       np.array([ROLE_CODE[all_specs[i][1].role] for i in idx], np.int8),
                       np.array([all_specs[i][1].ent for i in idx], np.float32).reshape(-1, ENT_WIDTH),
                       [cased[i] if cfg.keep_raw_text else None for i in idx],
                       [caps_hashes(cased[i], salt) for i in idx])
        return records, rows, (next_id + len(all_specs), next_group, next_num)

    def _template_words(self, snap: StoreSnapshot) -> frozenset[str]:
        """:func:`template_words` of the snapshot's negatives, computed once per negative bank (every run-time
        ``add_target`` asks; only ``set_negatives`` changes the bank)."""
        bank = snap.banks.get("neg_content")
        if self._template is None or self._template[0] is not bank:
            self._template = (bank, template_words(snap))
        return self._template[1]

    def add_targets(self, targets: Sequence[ForgetTarget], memo: bool = False) -> None:
        """Add several targets in one swap (ids must be new)."""
        with self._lock:
            snap = self._snap
            seen = set(snap.num_of)
            for t in targets:
                if t.id in seen:
                    raise StoreError(f"target {t.id!r} is already stored; use update_target to replace it")
                seen.add(t.id)
            self._snap = self._with_targets(snap, targets, memo)

    def _with_targets(self, snap: StoreSnapshot, targets: Sequence[ForgetTarget], memo: bool) -> StoreSnapshot:
        """A new snapshot with ``targets`` added."""
        if not targets:
            return snap
        records, rows, (nid, ngroup, nnum) = self._prepare(targets, snap, memo)
        banks = dict(snap.banks)
        for b, r in rows.items():
            banks[b] = banks[b].added(*r)
        tmap = dict(snap.targets)
        num_of = dict(snap.num_of)
        for rec in records:
            tmap[rec.num] = rec
            num_of[rec.id] = rec.num
        log.info("store: added %d target(s); query bank %d, content bank %d vectors", len(records),
                 len(banks["query"]), len(banks["content"]))
        return replace(snap, targets=tmap, num_of=num_of, banks=banks, matcher=_matcher(tmap.values(), snap.salt),
                       next_id=nid, next_group=ngroup, next_num=nnum)

    def add_target(self, target: ForgetTarget) -> None:
        """Add one target; effective for the next request."""
        self.add_targets([target])

    def remove_target(self, target_id: str) -> None:
        """Remove a target and all its vectors; effective for the next request."""
        with self._lock:
            self._snap = self._without(self._snap, target_id)

    def _without(self, snap: StoreSnapshot, target_id: str) -> StoreSnapshot:
        """A new snapshot without ``target_id``."""
        if target_id not in snap.num_of:
            raise StoreError(f"no target {target_id!r} in the store; stored: {snap.target_ids}")
        num = snap.num_of[target_id]
        banks = dict(snap.banks)
        for b in FORGET_BANKS:
            banks[b] = banks[b].removed(banks[b].target != num)
        tmap = {n: r for n, r in snap.targets.items() if n != num}
        num_of = {k: v for k, v in snap.num_of.items() if k != target_id}
        return replace(snap, targets=tmap, num_of=num_of, banks=banks, matcher=_matcher(tmap.values(), snap.salt))

    def update_target(self, target: ForgetTarget) -> None:
        """Replace a stored target by a new version in one swap."""
        with self._lock:
            snap = self._without(self._snap, target.id)
            self._snap = self._with_targets(snap, [target], memo=False)

    # -- negatives --------------------------------------------------------------------------------
    def set_negatives(self, items: Sequence[NegativeItem], memo: bool = False,
                      forget_names: Sequence[str] = ()) -> None:
        """Replace the negatives: split into indexed (training) and held-out (calibration) shares.

        Call it before adding targets (as :meth:`from_task` does): stored forget entries record at
        insertion whether they name a negative subject, and are not revisited here.
        """
        cfg = self.config
        train, calib = split_negatives(items, cfg.calib_fraction, cfg.split_seed, cfg.max_negatives_per_group)
        if self._snap.targets:
            log.warning("set_negatives after targets were added: their 'names someone else' feature keeps the old "
                        "subject list; rebuild the store to refresh it")
        names = subject_names(train, [*forget_names, *(n for r in self._snap.targets.values() for n in r.names)])

        def flat(its: Sequence[NegativeItem], attr: str) -> tuple[list[str], list[str], list[int]]:
            """(cased normalised texts, groups, item numbers) of one field of the items."""
            texts, groups, item_no = [], [], []
            for k, it in enumerate(its):
                for t in getattr(it, attr):
                    texts.append(normalize_cased(t))
                    groups.append(it.group)
                    item_no.append(k)
            return texts, groups, item_no

        cluster_of: dict[tuple[str, ...], int] = {}
        calib_cluster = [cluster_of.setdefault(cluster_key(it), len(cluster_of)) for it in calib]
        train_of: dict[tuple[str, ...], int] = {}
        train_cluster = np.asarray([train_of.setdefault(cluster_key(it), len(train_of)) for it in train], np.int64)

        parts = {(split, attr): flat(its, attr) for split, its in (("train", train), ("calib", calib))
                 for attr in ("queries", "contents")}
        # The prompt channel's known negatives include their answers and texts: a prompt can carry them (an
        # assistant turn, a pasted passage), and the targets' descriptions come from answers and texts too.
        q, c = parts[("train", "queries")], parts[("train", "contents")]
        parts[("train", "queries")] = (q[0] + c[0], q[1] + c[1], q[2] + c[2])
        all_texts = [t for p in parts.values() for t in p[0]]
        vecs = self.encoder.encode([normalize(t) for t in all_texts], memo=memo)
        with self._lock:
            snap = self._snap
            banks = dict(snap.banks)
            calib_sets = dict(snap.calib)
            next_id, next_group = snap.next_id, snap.next_group
            off = 0
            for (split, attr), (texts, groups, item_no) in parts.items():
                v = vecs[off:off + len(texts)] if len(texts) else np.zeros((0, snap.dim), np.float32)
                off += len(texts)
                bank_name = "neg_query" if attr == "queries" else "neg_content"
                if split == "train":
                    n = len(texts)
                    ids = np.arange(next_id, next_id + n, dtype=np.int64)
                    # One group per cluster (person, document): training leaves a negative's whole cluster
                    # out of its nearest-negative features, as it is for an unseen person.
                    gid = next_group + train_cluster[np.asarray(item_no, dtype=np.int64)]
                    next_id += n
                    next_group += len(train_of)
                    role = np.array([ROLE_CODE.get(f"neg_{g}", ROLE_CODE["neg_other"]) for g in groups], np.int8)
                    fresh = Bank.empty(snap.dim, cfg)
                    banks[bank_name] = fresh.added(v, ids, np.full(n, -1, np.int32), gid, role,
                                                   np.zeros((n, ENT_WIDTH), np.float32), texts,
                                                   [caps_hashes(t, snap.salt) for t in texts])
                else:
                    calib_sets["query" if attr == "queries" else "content"] = CalibrationSet(
                        np.ascontiguousarray(v), tuple(texts), tuple(groups), tuple(calib_cluster[k] for k in item_no))
            self._snap = replace(snap, banks=banks, calib=calib_sets, next_id=next_id, next_group=next_group,
                                 neg_names=names, neg_matcher=neg_name_matcher(names, snap.salt))
        log.info("store: negatives %d train / %d calibration items, %d known subjects", len(train), len(calib), len(names))
