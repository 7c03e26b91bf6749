"""Per (text unit, candidate target) features: neighbour similarities, known-negative margin, entity match.

For each unit the candidates are the two best targets among its top-k neighbours in the forget bank
plus any target whose names or key phrases occur in the text. The features do not depend on which
target it is, so one classifier serves targets added later:

========== ==========================================================================
top1       best cosine to the candidate's stored vectors (or the k-th score if absent)
top3       mean of its three best cosines (missing ones count as the k-th score)
frac       share of the top-k neighbours that belong to the candidate
gap        top1 minus the best cosine to any other target
neg1       best cosine to a stored negative (neighbour/retain/benign) in the same channel
neg3       mean of the three best negative cosines
margin     top1 - neg1: closer to the forget side than to any known negative?
ent_full   a full name or alias of the candidate occurs (after normalisation)
ent_partial share of the name's tokens present (surname only = 0.5)
ent_phrase a key phrase (quoted title) of the candidate occurs
partial_only ent_partial when below 1 and no full name matched (a namesake: shares a surname or first name)
top1_x_partial top1 * ent_partial (similar *and* about someone with that name)
foreign_only share of the text's proper nouns (capitalised, not sentence-initial) that the candidate's
           own data never uses, when no full name matched: "How did Getachew Fikru ..." is about
           someone else even if it is phrased like a forget question
other_name the text names a known negative subject (a retain or neighbour person) in full and no full
           name of the candidate
========== ==========================================================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from detectors.entities import phrase_hash, telling_tokens
from detectors.normalize import normalize, skeleton_tokens
from detectors.store import (
    StoreSnapshot,
    TargetRecord,
    caps_hashes,
    foreign_share,
    mentions_other,
    question_key,
)

FEATURES: tuple[str, ...] = ("top1", "top3", "frac", "gap", "neg1", "neg3", "margin", "ent_full", "ent_partial",
                             "ent_phrase", "partial_only", "top1_x_partial", "foreign_only", "other_name")
CHANNELS: dict[str, tuple[str, str]] = {"prompt": ("query", "neg_query"), "leak": ("content", "neg_content")}
_NEG_K = 3
RULE_NONE, RULE_NAME, RULE_QUESTION, RULE_VALUE, RULE_FACT, RULE_BIRTH = 0, 1, 2, 3, 4, 5
"""Why a pair is flagged whatever its score: no rule, the target's full name, a stored question verbatim, an
identifying value of the target (an e-mail address, a 6+ digit number), (output check, in a conversation about
the target) one of its stored facts, or (prompt check) the target's stored birth date (set by the detector's
birth-date rule, not here)."""
MIN_RULE_NAME_TOKENS = 2
"""A name found whole flags on its own only with this many identifying tokens: a bare surname or first name
(what namesakes share) stays a feature."""


@dataclass(frozen=True)
class PairBatch:
    """Features of every (unit, candidate target) pair of a batch of units."""

    unit: np.ndarray
    target: np.ndarray
    X: np.ndarray
    best_id: np.ndarray
    entity_detail: tuple[str, ...]
    n_units: int
    rule: np.ndarray | None = None
    """Per pair: RULE_NONE, RULE_NAME, RULE_QUESTION or RULE_VALUE (all RULE_NONE for stored positives)."""
    unit_neg1: np.ndarray | None = None
    """Per unit: the cosine to its nearest known negative (None when nothing was searched)."""
    named: np.ndarray | None = None
    """Per pair: the text names the candidate, in full or by a variant that points to no one else."""

    def unit_max(self, scores: np.ndarray) -> np.ndarray:
        """Per-unit maximum of pair scores (0 for a unit without candidates)."""
        out = np.zeros(self.n_units, dtype=np.float64)
        if len(scores):
            np.maximum.at(out, self.unit, scores)
        return out


def _search(bank_index, E: np.ndarray, k: int, rows_of, attr: np.ndarray, exclude: np.ndarray | None,
            extra: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (scores, ids, rows) with entries whose ``attr`` equals ``exclude`` (per query) removed."""
    S, ids = bank_index.search(E, k + extra)
    rows = rows_of(ids)
    if exclude is not None and extra > 0:
        bad = (rows >= 0) & (np.where(rows >= 0, attr[rows.clip(0)], -2) == exclude[:, None])
        S = np.where(bad, -np.inf, S)
        order = np.argsort(-S, axis=1, kind="stable")[:, :k]
        S = np.take_along_axis(S, order, 1)
        ids = np.take_along_axis(ids, order, 1)
        rows = np.take_along_axis(rows, order, 1)
        rows = np.where(np.isfinite(S), rows, -1)
    else:
        S, ids, rows = S[:, :k], ids[:, :k], rows[:, :k]
    return S, ids, rows


def _max_group_size(groups: np.ndarray) -> int:
    """Size of the largest group (how many extra neighbours leave-one-group-out must fetch)."""
    if len(groups) == 0:
        return 0
    return int(np.unique(groups, return_counts=True)[1].max())


_WORD = re.compile(r"[^\W_]+")
_NAME_GLUE = frozenset("mr mrs ms miss mx dr prof professor sir dame lady lord madam the of and in at by for to "
                       "who what where when which why how is was did does do has had".split())


def beside_other_name(cased: str, target: TargetRecord, salt: str) -> bool:
    """Whether a name part of ``target`` stands next to a capitalised word that its data never uses ("Wesley Yang"
    for target "Yang Bi"): then the text names someone else who shares that part, wherever it stands (a
    sentence-initial word is no proper noun to :func:`~detectors.store.foreign_share`)."""
    own = target.name_token_set()
    words = [m.group(0) for m in _WORD.finditer(cased)]
    lows = [w.casefold() for w in words]
    for i, low in enumerate(lows):
        if low not in own:
            continue
        for j in (i - 1, i + 1):
            if 0 <= j < len(words) and words[j][:1].isupper() and lows[j] not in own and lows[j] not in _NAME_GLUE \
                    and not target.explains(phrase_hash((lows[j],), salt)):
                return True
    return False


_ASKING = frozenset("""who whom whose what which where when why how is are was were do does did can could would
    should will has have had tell describe explain list give write name share provide summarise summarize say show
    find compare please""".split())


def asks(cased: str) -> bool:
    """Whether a text asks something (a question mark, or a question or request word first): a name part alone
    points to a target in a question about them ("Where was Philippa born?"), not in a statement, which is as
    likely about a namesake ("Yang opposes this ideology")."""
    if "?" in cased:
        return True
    m = _WORD.search(cased)
    return bool(m) and m.group(0).casefold() in _ASKING


def pair_features(snap: StoreSnapshot, channel: str, E: np.ndarray, texts: Sequence[str], k: int, *,
                  own_target: np.ndarray | None = None, own_ent: np.ndarray | None = None,
                  exclude_group: np.ndarray | None = None, exclude_neg_group: np.ndarray | None = None,
                  unit_caps: Sequence[tuple[str, ...]] | None = None,
                  about: Sequence[frozenset[int]] | None = None) -> PairBatch:
    """Features of all candidate pairs for units ``E`` (unit vectors) with cased normalised ``texts``.

    Training uses ``own_target``/``own_ent`` (entity features of a stored positive against its own
    target, computed at insertion, so no raw text is needed), ``unit_caps`` (its proper-noun hashes,
    for the foreign-name feature against other targets) and leave-one-group-out exclusions, so
    that a stored item does not find itself.

    A name variant (a first name, a surname, a title and surname: :attr:`EntityHit.variant`) counts as the
    full name in a unit that asks something (:func:`asks`) when nothing in it points to someone else (no proper
    noun the target's data does not explain, none beside the name part: :func:`beside_other_name`, no known
    negative subject or other target named in full), or when the unit belongs to a
    conversation ``about`` that target (target numbers per unit, output check); there its stored facts
    flag (:data:`RULE_FACT`).
    """
    pos_name, neg_name = CHANNELS[channel]
    pos, neg = snap.banks[pos_name], snap.banks[neg_name]
    training = exclude_neg_group is not None
    m = len(E)
    empty = PairBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(FEATURES))),
                      np.zeros(0, np.int64), (), m, np.zeros(0, np.int8))
    if m == 0 or len(pos) == 0:
        return empty
    kk = min(k, len(pos))
    extra = _max_group_size(pos.group) if exclude_group is not None else 0
    S, ids, R = _search(pos.index, E, kk, pos.rows, pos.group, exclude_group, extra)
    T = np.where(R >= 0, pos.target[R.clip(0)], -1).astype(np.int64)
    valid = T >= 0
    S = np.where(valid, S, -np.inf)
    floor = np.where(valid.any(1), np.where(valid, S, np.inf).min(1), 0.0)

    if len(neg):
        nextra = _max_group_size(neg.group) if exclude_neg_group is not None else 0
        SN, _, RN = _search(neg.index, E, min(_NEG_K, len(neg)), neg.rows, neg.group, exclude_neg_group, nextra)
        SN = np.where(RN >= 0, SN, 0.0)
        if SN.shape[1] < _NEG_K:
            SN = np.pad(SN, ((0, 0), (0, _NEG_K - SN.shape[1])), constant_values=0.0)
        neg1, neg3 = SN[:, 0], SN.mean(1)
    else:
        neg1 = neg3 = np.zeros(m)

    # Candidates: the best target, the best other target, entity hits.
    c1 = T[:, 0]
    other_mask = valid & (T != c1[:, None])
    has2 = other_mask.any(1)
    c2 = np.where(has2, T[np.arange(m), other_mask.argmax(1)], -1)
    unit_l: list[int] = []
    targ_l: list[int] = []
    ent_l: list[tuple[float, ...]] = []
    det_l: list[str] = []
    rule_l: list[int] = []
    named: set[tuple[int, int]] = set()
    for u in range(m):
        hits: dict[int, tuple[tuple[float, ...], str]] = {}
        rules: dict[int, int] = {}
        own = -1
        if own_target is not None:
            own = int(own_target[u])
            hits[own] = (tuple(float(x) for x in own_ent[u]), "")
            caps = unit_caps[u] if unit_caps is not None else ()
            other = float(own_ent[u][4])
        else:
            caps = caps_hashes(texts[u], snap.salt)
            toks = skeleton_tokens(normalize(texts[u]))
            other = mentions_other(snap, "", toks, leave_one_out=exclude_neg_group is not None)
            about_u = about[u] if about is not None else frozenset()
            # The stored negatives the classifier trains on keep their name variants unpromoted: labelling a
            # promoted variant negative would teach it to distrust a name (measured on TOFU: held-out retain FPR 0.0105 ->
            # 0.0126 with promotion in training); detection and calibration promote.
            ent_hits = snap.matcher.match_tokens(toks, facts={snap.target_id(n) for n in about_u})
            fulls = {tid for tid, h in ent_hits.items() if h.full}
            for tid, h in ent_hits.items():
                num = snap.num_of.get(tid)
                if num is None:
                    continue
                e, d = (h.full, h.partial, h.phrase), h.detail
                # A name part that points to no one else makes the conversation about the target (the output check
                # knows it); in a question or request it also counts as the name for the prompt check.
                alone = (h.variant and not training and other == 0 and not fulls - {tid}
                         and foreign_share(caps, snap.targets[num]) == 0
                         and not beside_other_name(texts[u], snap.targets[num], snap.salt))
                if h.variant and not training and (num in about_u or (alone and asks(texts[u]))):
                    e, d = (1.0, 1.0, h.phrase), f"name variant of {snap.targets[num].names[0]!r}"
                hits[num] = (e, d)
                if e[0] > 0 or alone:
                    named.add((u, num))
                if h.full_tokens >= MIN_RULE_NAME_TOKENS:
                    rules[num] = RULE_NAME
                elif h.value:
                    rules[num] = RULE_VALUE
                elif h.fact and num in about_u:
                    rules[num] = RULE_FACT
            if channel == "prompt" and toks:
                for num in snap.question_index.get(question_key(texts[u], snap.salt), ()):
                    rules[num] = RULE_QUESTION
        cands = [int(c) for c in (c1[u], c2[u]) if c >= 0]
        cands += [n for n in (*hits, *rules) if n not in cands]
        for c in cands:
            unit_l.append(u)
            targ_l.append(c)
            rule_l.append(rules.get(c, RULE_NONE))
            e, d = hits.get(c, ((0.0, 0.0, 0.0), ""))
            if c != own:
                e = e[:3] + (foreign_share(caps, snap.targets[c]) if c in snap.targets else 0.0, other)
            ent_l.append(e)
            det_l.append(d)
    if not unit_l:
        return replace(empty, unit_neg1=neg1)
    r = np.asarray(unit_l, dtype=np.int64)
    c = np.asarray(targ_l, dtype=np.int64)
    ent = np.asarray(ent_l, dtype=np.float64)
    St, Tt = S[r], T[r]
    M = Tt == c[:, None]
    fl = floor[r]
    mine = np.where(M, St, -np.inf)
    top_sorted = -np.sort(-mine, axis=1)[:, :3]
    if top_sorted.shape[1] < 3:
        top_sorted = np.pad(top_sorted, ((0, 0), (0, 3 - top_sorted.shape[1])), constant_values=-np.inf)
    top_sorted = np.where(np.isfinite(top_sorted), top_sorted, fl[:, None])
    top1 = top_sorted[:, 0]
    top3 = top_sorted.mean(1)
    frac = M.sum(1) / float(kk)
    others = np.where(~M & (Tt >= 0), St, -np.inf).max(1)
    others = np.where(np.isfinite(others), others, fl)
    best_pos = np.where(M.any(1), mine.argmax(1), -1)
    best_id = np.where(best_pos >= 0, ids[r, best_pos.clip(0)], -1)
    X = np.column_stack([top1, top3, frac, top1 - others, neg1[r], neg3[r], top1 - neg1[r],
                         ent[:, 0], ent[:, 1], ent[:, 2], np.where((ent[:, 0] == 0) & (ent[:, 1] < 1.0), ent[:, 1], 0.0),
                         top1 * ent[:, 1], ent[:, 3] * (1.0 - ent[:, 0]), ent[:, 4] * (1.0 - ent[:, 0])])
    is_named = np.fromiter(((int(a), int(b)) in named for a, b in zip(r, c, strict=True)), dtype=bool, count=len(r))
    return PairBatch(r, c, X, best_id, tuple(det_l), m, np.asarray(rule_l, dtype=np.int8), neg1, is_named)


def description_similarity(snap: StoreSnapshot, E: np.ndarray, texts: Sequence[str],
                           neg1: np.ndarray | None, floor: float = -1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the similarity decision's (score, target number): the cosine to the nearest stored description
    of a target (a sentence of its forget texts or answers, names masked) where that is closer than any known
    negative (``neg1``: :attr:`PairBatch.unit_neg1` of the prompt channel, which searched the same negatives)
    and the text names nothing the target's data never mentions; else (-2, -1). A text naming someone or
    something else is left to the classifier, which weighs the names. At or above ``floor`` (the least cosine
    the decision acts on; below it the score is returned as is) the text must also share a telling token
    (:func:`~detectors.entities.telling_tokens`) with the target's data: "Where was this person born?" is close
    to "this person was born in East Ivelmoor" and describes no one."""
    desc = snap.banks["description"]
    score = np.full(len(E), -2.0)
    target = np.full(len(E), -1, dtype=np.int64)
    if len(desc) == 0 or len(E) == 0 or neg1 is None:  # no neighbours searched: no forget query bank, no targets
        return score, target
    S, ids = desc.index.search(E, 1)
    rows = desc.rows(ids[:, 0])
    for u in np.flatnonzero((rows >= 0) & (S[:, 0] > neg1)):
        t = int(desc.target[rows[u]])
        rec = snap.targets.get(t)
        if rec is None or foreign_share(caps_hashes(texts[u], snap.salt), rec) != 0:
            continue
        if S[u, 0] >= floor and not any(rec.explains(phrase_hash((tok,), snap.salt))
                                        for tok in telling_tokens(texts[u])):
            continue
        score[u], target[u] = float(S[u, 0]), t
    return score, target
