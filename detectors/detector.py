"""The forget-target detector: store + entity matcher + faiss search + logistic scorer + conformal threshold.

Typical use::

    det = Detector.build(task)                      # encodes, indexes, trains, calibrates
    det.detect("Where was Elara Vosberg born?")     # Detection(flagged=True, score=0.99, ...)
    det.detect_leak(model_answer)                   # output check against forget answers/texts
    det.add_target(new_target)                      # effective for the next request
    det.save("runs/detector"); Detector.load("runs/detector")

Two channels share the machinery: "prompt" scores inputs against forget questions (and variants),
"leak" scores generated text against forget answers and texts. Each has its own classifier and
its own calibrated threshold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.generation import Prompt
from core.schema import ForgetTarget, ForgetTask
from detectors.calibration import CalibrationReport, calibrate, conformal_threshold, group_thresholds
from detectors.classifier import ChannelModel, ClassifierError, LogisticScorer
from detectors.config import DetectorConfig
from detectors.encoder import Encoder
from detectors.entities import birth_date_hash, birth_dates, without_dates
from detectors.features import (
    CHANNELS,
    FEATURES,
    RULE_BIRTH,
    RULE_FACT,
    RULE_NAME,
    RULE_NONE,
    RULE_QUESTION,
    RULE_VALUE,
    PairBatch,
    description_similarity,
    pair_features,
)
from detectors.index import set_faiss_threads
from detectors.inputs import calibration_prompts, prompt_units, text_units
from detectors.normalize import normalize, skeleton_tokens
from detectors.persistence import read_detector, save_detector
from detectors.store import ROLES, ForgetStore, NegativeItem, StoreSnapshot, caps_hashes, foreign_share
from detectors.types import Detection, Evidence

log = logging.getLogger(__name__)

_MAX_TRAIN_POSITIVES = 20_000
_DESCRIPTION = ROLES.index("description")

_MAX_EVIDENCE_TARGETS = 3


@dataclass(frozen=True)
class _Scored:
    """What :meth:`Detector._item_scores` computes for a batch of items (prompts or answers)."""

    scores: np.ndarray
    """Per item: the max pair score (1 where a rule fires)."""
    ruled: np.ndarray
    """Per item: whether a rule fired."""
    sim: np.ndarray
    """Per item: the similarity decision's max score (-2: none)."""
    pairs: PairBatch
    pair_scores: np.ndarray
    pair_rules: np.ndarray
    pair_owner: np.ndarray
    owner: np.ndarray
    """Per unit: its item."""
    unit_sim: np.ndarray
    unit_sim_target: np.ndarray


_RULE_DETAIL = {RULE_NAME: "names the target in full", RULE_QUESTION: "repeats a stored forget question",
                RULE_VALUE: "states an identifying value of the target",
                RULE_FACT: "states a stored fact of the target the conversation is about",
                RULE_BIRTH: "gives the target's birth date"}


class DetectorNotFittedError(RuntimeError):
    """``detect`` was called before the classifiers were trained (call ``fit``)."""


_PARTIAL, _OTHER_NAME = FEATURES.index("ent_partial"), FEATURES.index("other_name")


class _BirthDates:
    """The birth-date rule (``DetectorConfig.birth_date_rule``, prompt channel only: the output check stays as strict as
    it is) over one batch of units. A person has one birth date: a unit that gives a target's stored birth date is
    about that target (a rule hit, as a full name is), and one that gives only other birth dates and does not name
    the target describes someone else (the pair scores 0). Dates are read lazily, only for units paired with a
    target that has a stored birth date."""

    def __init__(self, snap: StoreSnapshot, units: Sequence[str], on: bool) -> None:
        self.snap, self.units, self.on = snap, units, on
        self._hashes: dict[int, frozenset[str]] = {}

    def _compare(self, u: int, t: int) -> int:
        """1: unit ``u`` gives a birth date target ``t``'s data states; -1: it gives only others; 0: no evidence."""
        rec = self.snap.targets.get(t)
        if rec is None or not rec.birth_hashes:
            return 0
        h = self._hashes.get(u)
        if h is None:
            h = self._hashes[u] = frozenset(birth_date_hash(d, self.snap.salt) for d in birth_dates(self.units[u]))
        return 0 if not h else 1 if h & rec.birth_hashes else -1

    def _names_no_one_else(self, j: int, pb: PairBatch, named: bool) -> bool:
        """Pair ``j``'s unit names no one but (perhaps) the target (``named``: it names the target): no known negative
        subject, no name part shared with the target short of its name (a namesake: "Elsey Scarlet" for a target
        "... Scarlet"), and no proper noun, dates left out, that the target's data does not use."""
        u, t = int(pb.unit[j]), int(pb.target[j])
        if pb.X[j, _OTHER_NAME] > 0 or (pb.X[j, _PARTIAL] > 0 and not named):
            return False
        return foreign_share(caps_hashes(without_dates(self.units[u]), self.snap.salt), self.snap.targets[t]) == 0

    def pairs(self, pb: PairBatch, rules: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pair without another rule: (gives the target's birth date and names no one else, gives only other
        birth dates and does not name the target). People share birthdays: "Rozella Lavender was born on September
        8, 1971" is about Rozella Lavender even where a target was born that day (LUME task 2 has two such)."""
        same, other = np.zeros(len(pb.unit), dtype=bool), np.zeros(len(pb.unit), dtype=bool)
        if self.on:
            for j in np.flatnonzero(rules == RULE_NONE):
                c = self._compare(int(pb.unit[j]), int(pb.target[j]))
                named = pb.named is not None and bool(pb.named[j])
                same[j] = c > 0 and self._names_no_one_else(int(j), pb, named)
                other[j] = c < 0 and not named
        return same, other

    def unit_conflicts(self, unit_target: np.ndarray) -> np.ndarray:
        """Per unit: it gives only other birth dates than the target of its nearest description (similarity decision)."""
        out = np.zeros(len(unit_target), dtype=bool)
        if self.on:
            for u in np.flatnonzero(unit_target >= 0):
                out[u] = self._compare(int(u), int(unit_target[u])) < 0
        return out


class Detector:
    """Calibrated, updatable forget-target detector; thread-safe for concurrent ``detect`` calls."""

    def __init__(self, store: ForgetStore, config: DetectorConfig,
                 models: dict[str, ChannelModel] | None = None, meta: dict[str, Any] | None = None) -> None:
        """Wrap a store and (optionally) trained channel models; prefer :meth:`build` or :meth:`load`."""
        self.store = store
        self.config = config
        self._models: dict[str, ChannelModel] = dict(models or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self._fit_lock = threading.Lock()
        set_faiss_threads(config.faiss_threads)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def build(cls, task: ForgetTask, config: DetectorConfig | None = None, encoder: Encoder | None = None,
              negatives: Sequence[NegativeItem] | None = None) -> Detector:
        """Build the store from ``task``, train both channels and calibrate their thresholds."""
        cfg = config or DetectorConfig()
        enc = encoder or Encoder.from_config(cfg)
        t0 = time.perf_counter()
        store = ForgetStore.from_task(task, enc, cfg, negatives)
        det = cls(store, cfg, meta={"task": task.name, "encoder": enc.name})
        det.fit()
        det.meta["build_seconds"] = round(time.perf_counter() - t0, 3)
        return det

    @property
    def encoder(self) -> Encoder:
        """The sentence encoder shared with the store."""
        return self.store.encoder

    @property
    def target_ids(self) -> list[str]:
        """Ids of the targets currently stored."""
        return self.store.target_ids

    def target(self, target_id: str) -> ForgetTarget:
        """The stored target as a ForgetTarget (id, kind, names, policy; no QA/texts), or KeyError."""
        snap = self.store.snapshot()
        if target_id not in snap.num_of:
            raise KeyError(f"no target {target_id!r}; stored: {snap.target_ids}")
        rec = snap.targets[snap.num_of[target_id]]
        return ForgetTarget(id=rec.id, kind=rec.kind, names=list(rec.names),  # type: ignore[arg-type]
                            policy=rec.policy or f"Do not reveal information about {rec.names[0]}.")

    @property
    def models(self) -> dict[str, ChannelModel]:
        """The current channel models (a snapshot)."""
        return dict(self._models)

    @property
    def threshold(self) -> float:
        """The calibrated threshold of the prompt channel."""
        return self._model("prompt").threshold

    @property
    def calibration(self) -> dict[str, CalibrationReport]:
        """Calibration report per channel."""
        return {k: m.calibration for k, m in self._models.items()}

    def _model(self, channel: str) -> ChannelModel:
        """The channel's model or a clear error if not trained."""
        m = self._models.get(channel)
        if m is None:
            raise DetectorNotFittedError(f"the {channel!r} channel is not trained; call Detector.fit()")
        return m

    # -- training ---------------------------------------------------------------------------------
    def _training_set(self, snap: StoreSnapshot, channel: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pair features, labels and weights: stored positives (leave-one-group-out) and indexed negatives.

        Weights balance the classes and, within the negatives, give every group (neighbour, retain,
        benign, ..., and "another target's positive") the same total weight, so the few hard
        neighbours count as much as the many easy benign questions.
        """
        pos_name, neg_name = CHANNELS[channel]
        pos, neg = snap.banks[pos_name], snap.banks[neg_name]
        if len(pos) == 0:
            raise ClassifierError(f"{channel}: the store has no forget entries to train on")
        if len(neg) == 0:
            raise ClassifierError(f"{channel}: no negatives to train on (give a task with retain/benign data "
                                  f"or keep builtin_benign=True)")
        ids, vecs = pos.index.items()
        if not np.array_equal(ids, pos.ids):
            raise ClassifierError(f"{channel}: index and metadata of bank {pos_name!r} disagree")
        sel = np.flatnonzero(pos.role != _DESCRIPTION)  # descriptions are neighbours to find, not prompts to learn
        if len(sel) == 0:
            raise ClassifierError(f"{channel}: the store has no forget prompts to train on (only descriptions)")
        if len(sel) > _MAX_TRAIN_POSITIVES:
            sel = np.sort(np.random.default_rng(self.config.split_seed).choice(sel, _MAX_TRAIN_POSITIVES, replace=False))
        k = self.config.top_k
        pb = pair_features(snap, channel, vecs[sel], [""] * len(sel), k, own_target=pos.target[sel].astype(np.int64),
                           own_ent=pos.ent[sel], exclude_group=pos.group[sel], unit_caps=[pos.caps[i] for i in sel])
        y_pos = (pb.target == pos.target[sel][pb.unit]).astype(np.int64)
        nids, nvecs = neg.index.items()
        if not np.array_equal(nids, neg.ids):
            raise ClassifierError(f"{channel}: index and metadata of bank {neg_name!r} disagree")
        nb = pair_features(snap, channel, nvecs, [t or "" for t in neg.texts], k, exclude_neg_group=neg.group)
        X = np.concatenate([pb.X, nb.X])
        y = np.concatenate([y_pos, np.zeros(len(nb.X), np.int64)])
        # Negative group of each negative pair: the bank role of its unit, or "cross-target".
        neg_tag = np.concatenate([np.where(y_pos == 1, -1, 10_000), neg.role[nb.unit].astype(np.int64)])
        w = np.zeros(len(y), dtype=np.float64)
        n_pos = max(1, int((y == 1).sum()))
        w[y == 1] = 1.0 / n_pos
        tags = [t for t in np.unique(neg_tag) if t != -1]
        for t in tags:
            sel_t = neg_tag == t
            w[sel_t] = 1.0 / (len(tags) * sel_t.sum())
        return X, y, w * len(y) / 2.0

    def _fit_channel(self, snap: StoreSnapshot, channel: str) -> ChannelModel:
        """Train one channel's scorer and calibrate its threshold on the held-out negatives."""
        pos_name, _ = CHANNELS[channel]
        pos = snap.banks[pos_name]
        X, y, w = self._training_set(snap, channel)
        scorer = LogisticScorer.fit(X, y, FEATURES, C=self.config.l2, sample_weight=w)
        calib = snap.calib["query" if channel == "prompt" else "content"]
        if len(calib.texts) == 0:
            raise ClassifierError(f"{channel}: no calibration negatives (raise calib_fraction or add negatives)")
        # Calibrate what is deployed: each calibration prompt is scored by the function detection applies
        # (its units, windows, turns, the rules, the max), composed multi-turn and long prompts included.
        cfg = self.config
        if channel == "prompt":
            prompts, groups = calibration_prompts(calib, snap.calib["content"], cfg.split_seed, cfg.calibration_prompts)
            unit_lists = [prompt_units(p, cfg.window_words, cfg.window_stride, cfg.max_turns) for p in prompts]
        else:
            groups = list(calib.groups)
            unit_lists = [text_units(t, cfg.window_words, cfg.window_stride) for t in calib.texts]
        scored = self._item_scores(snap, channel, scorer, unit_lists, memo=True)
        neg_scores, neg_ruled, neg_sim = scored.scores, scored.ruled, scored.sim
        # Positives' scores for the TPR report: leave-one-group-out features, as in training.
        ids, vecs = pos.index.items()
        keep = np.flatnonzero(pos.role != _DESCRIPTION)
        pb = pair_features(snap, channel, vecs[keep], [""] * len(keep), self.config.top_k,
                           own_target=pos.target[keep].astype(np.int64), own_ent=pos.ent[keep],
                           exclude_group=pos.group[keep], unit_caps=[pos.caps[i] for i in keep])
        pos_scores = pb.unit_max(scorer.predict(pb.X))
        # Three decisions share target_fpr (a union bound): the rules flag what they flag (their rate on the
        # calibration prompts is spent first), the similarity decision gets `share` of the rest, the classifier
        # the remainder, each threshold conformal on the prompts the rules leave.
        share = cfg.similarity_share if channel == "prompt" else 0.0
        rule_rate = float(neg_ruled.mean()) if len(neg_ruled) else 0.0
        budget = max(cfg.target_fpr - rule_rate, cfg.target_fpr * 0.05)
        if rule_rate > 0:
            log.warning("%s channel: the rules flag %.4f of the calibration prompts; the thresholds share the rest "
                        "of target FPR %.4g", channel, rule_rate, cfg.target_fpr)
        free = ~neg_ruled
        groups_free = [g for g, f in zip(groups, free, strict=True) if f]
        report = calibrate(neg_scores[free], budget * (1.0 - share), pos_scores, groups_free,
                           per_group=cfg.calibration == "group", placement=cfg.placement,
                           pos_quantile=cfg.pos_quantile, scope="deployed")
        report.target_fpr, report.rule_fpr = cfg.target_fpr, rule_rate
        flagged = neg_ruled | (neg_scores > report.threshold)
        if share > 0:
            s_alpha = budget * share
            s_thr, _, _ = conformal_threshold(neg_sim[free], s_alpha, warn=False)
            if cfg.calibration == "group":  # per group as the classifier's threshold (Mondrian)
                s_thr = max([s_thr, *group_thresholds(neg_sim[free], s_alpha, np.asarray(groups_free))[0].values()])
            s_thr = max(float(s_thr), cfg.similarity_floor)
            report.similarity_threshold, report.similarity_fpr = s_thr, s_alpha
            flagged |= neg_sim > s_thr
        report.fpr_calibration = float(np.mean(flagged))
        log.info("%s channel: threshold %.4f (rank %d of %d negatives), calibration FPR %.4f, LOO TPR %.4f",
                 channel, report.threshold, report.rank, report.n_negatives, report.fpr_calibration, report.tpr or 0.0)
        return ChannelModel(scorer, report)

    def fit(self) -> dict[str, CalibrationReport]:
        """(Re)train both channels on the current store and recalibrate; swaps models atomically."""
        with self._fit_lock:
            t0 = time.perf_counter()
            snap = self.store.snapshot()
            models = {ch: self._fit_channel(snap, ch) for ch in CHANNELS}
            self._models = models
            self.meta["fit_seconds"] = round(time.perf_counter() - t0, 3)
            return {k: m.calibration for k, m in models.items()}

    refit = fit

    # -- updates ----------------------------------------------------------------------------------
    def add_target(self, target: ForgetTarget, refit: bool = False) -> None:
        """Add a target; the next request sees it. ``refit`` also retrains and recalibrates."""
        self.store.add_target(target)
        if refit:
            self.fit()

    def remove_target(self, target_id: str, refit: bool = False) -> None:
        """Remove a target; the next request no longer sees it."""
        self.store.remove_target(target_id)
        if refit:
            self.fit()

    def update_target(self, target: ForgetTarget, refit: bool = False) -> None:
        """Replace a target (same id) in one swap."""
        self.store.update_target(target)
        if refit:
            self.fit()

    # -- scoring ----------------------------------------------------------------------------------
    def _rules(self, pb: PairBatch, channel: str) -> np.ndarray:
        """The rule of each pair that the config enables (RULE_NONE where none fires)."""
        r = pb.rule if pb.rule is not None else np.zeros(len(pb.X), np.int8)
        on = np.zeros(len(r), dtype=bool)
        if self.config.name_rule:
            on |= r == RULE_NAME
        if self.config.question_rule and channel == "prompt":
            on |= r == RULE_QUESTION
        if self.config.value_rule:
            on |= r == RULE_VALUE
        if self.config.fact_rule and channel == "leak":
            on |= r == RULE_FACT
        return np.where(on, r, RULE_NONE).astype(np.int8)

    def _item_scores(self, snap: StoreSnapshot, channel: str, scorer: LogisticScorer, unit_lists: list[list[str]],
                     memo: bool = False, about: Sequence[frozenset[int]] | None = None) -> _Scored:
        """Score items as detection does: one encoder call, pair scores (1 where a rule fires), max per item, and
        the similarity decision's score per unit; calibration and :meth:`_detect_units` both call it, so the
        thresholds are calibrated on the deployed scores. ``about``: per item, the target numbers its
        conversation is about (output check)."""
        flat = [u for us in unit_lists for u in us]
        owner = np.repeat(np.arange(len(unit_lists)), [len(us) for us in unit_lists])
        E = self.encoder.encode([normalize(u) for u in flat], memo=memo)
        pb = pair_features(snap, channel, E, flat, self.config.top_k,
                           about=[about[int(o)] for o in owner] if about is not None else None)
        rules = self._rules(pb, channel)
        births = _BirthDates(snap, flat, self.config.birth_date_rule and channel == "prompt")
        same, other = births.pairs(pb, rules)
        rules = np.where(same, RULE_BIRTH, rules).astype(np.int8)
        probs = (np.where(rules > 0, 1.0, np.where(other, 0.0, scorer.predict(pb.X))) if len(pb.X)
                 else np.zeros(0))
        pair_owner = owner[pb.unit] if len(pb.unit) else np.zeros(0, np.int64)
        scores = np.zeros(len(unit_lists), dtype=np.float64)
        ruled = np.zeros(len(unit_lists), dtype=bool)
        if len(probs):
            np.maximum.at(scores, pair_owner, probs)
            ruled[pair_owner[rules > 0]] = True
        sim = np.full(len(unit_lists), -2.0)
        unit_sim, unit_sim_target = (
            description_similarity(snap, E, flat, pb.unit_neg1, self.config.similarity_floor) if channel == "prompt"
            else (np.full(len(flat), -2.0), np.full(len(flat), -1, np.int64)))
        if len(flat):
            unit_sim = np.where(births.unit_conflicts(unit_sim_target), -2.0, unit_sim)
            np.maximum.at(sim, owner, unit_sim)
        return _Scored(scores, ruled, sim, pb, probs, rules, pair_owner, owner, unit_sim, unit_sim_target)

    def _detect_units(self, unit_lists: list[list[str]], channel: str,
                      about: Sequence[Sequence[str]] | None = None) -> list[Detection]:
        """Score each item's units in one encoder call and one search per bank; max per item; rules flag."""
        model = self._model(channel)
        snap = self.store.snapshot()
        about_nums = None if about is None else [frozenset(snap.num_of[t] for t in ids if t in snap.num_of)
                                                 for ids in about]
        sc = self._item_scores(snap, channel, model.scorer, unit_lists, about=about_nums)
        pb, probs, rules, pair_owner = sc.pairs, sc.pair_scores, sc.pair_rules, sc.pair_owner
        thr = model.threshold
        s_thr = model.calibration.similarity_threshold
        near: dict[int, dict[int, float]] = {}  # item -> target -> best description cosine above s_thr
        if s_thr is not None:
            for u in np.flatnonzero(sc.unit_sim > s_thr):
                d = near.setdefault(int(sc.owner[u]), {})
                t = int(sc.unit_sim_target[u])
                d[t] = max(d.get(t, -2.0), float(sc.unit_sim[u]))
        named: list[set[int]] = [set() for _ in unit_lists]
        if pb.named is not None:
            for j in np.flatnonzero(pb.named):
                named[int(pair_owner[j])].add(int(pb.target[j]))
        best: list[dict[int, int]] = [{} for _ in unit_lists]
        for j in np.argsort(-probs, kind="stable"):
            item = int(pair_owner[j])
            t = int(pb.target[j])
            if t not in best[item]:
                best[item][t] = int(j)
        out = []
        for item in range(len(unit_lists)):
            ranked = sorted(best[item].items(), key=lambda kv: -probs[kv[1]])
            score = float(probs[ranked[0][1]]) if ranked else 0.0
            close = near.get(item, {})
            hit = [t for t, j in ranked if probs[j] > thr or rules[j] > 0 or t in close]
            hit += [t for t in close if t not in hit]
            tids = [snap.target_id(t) for t in hit]
            ev: list[Evidence] = []
            for t, j in ranked[:_MAX_EVIDENCE_TARGETS]:
                if rules[j] > 0:
                    ev.append(Evidence(kind="rule", target_id=snap.target_id(t), score=1.0,
                                       detail=_RULE_DETAIL[int(rules[j])]))
                ev.extend(self._evidence(snap, channel, pb, j, snap.target_id(t), float(probs[j])))
            ev.extend(Evidence(kind="embedding", target_id=snap.target_id(t), score=min(1.0, max(0.0, c)),
                               detail=f"describes the target (cosine {c:.3f} to a stored description, "
                                      f"threshold {s_thr:.3f})") for t, c in close.items())
            about_ids = list(dict.fromkeys([*tids, *(snap.target_id(t) for t in sorted(named[item]))]))
            out.append(Detection(flagged=bool(hit), score=min(1.0, max(0.0, score)), threshold=thr, target_ids=tids,
                                 evidence=ev, about=about_ids))
        return out

    def _evidence(self, snap: StoreSnapshot, channel: str, pb: PairBatch, j: int, tid: str, prob: float) -> list[Evidence]:
        """Evidence for one (unit, target) pair: classifier score, nearest stored entry, entity match."""
        x = dict(zip(FEATURES, pb.X[j], strict=True))
        ev = [Evidence(kind="classifier", target_id=tid, score=min(1.0, max(0.0, prob)),
                       detail=f"margin to nearest negative {x['margin']:+.3f}")]
        bid = int(pb.best_id[j])
        if bid >= 0:
            bank = snap.banks[CHANNELS[channel][0]]
            row = int(bank.rows(np.array([bid]))[0])
            if row >= 0:
                role = ROLES[int(bank.role[row])]
                text = bank.texts[row]
                detail = f"nearest {role}: {text[:120]}" if text else f"nearest {role} #{bid}"
                ev.append(Evidence(kind="embedding", target_id=tid, score=float(min(1.0, max(0.0, x["top1"]))),
                                   detail=detail))
        if x["ent_full"] > 0 or x["ent_phrase"] > 0:
            ev.append(Evidence(kind="entity", target_id=tid, score=1.0, detail=pb.entity_detail[j] or "entity"))
        elif x["ent_partial"] > 0:
            ev.append(Evidence(kind="entity", target_id=tid, score=float(min(1.0, x["ent_partial"])),
                               detail="partial name"))
        return ev

    def detect(self, prompt: Prompt) -> Detection:
        """Score one prompt (a string or chat messages) against the forget targets."""
        return self.detect_batch([prompt])[0]

    def detect_batch(self, prompts: Sequence[Prompt]) -> list[Detection]:
        """Score many prompts with one encoder call; a prompt's score is the max over its units."""
        cfg = self.config
        units = [prompt_units(p, cfg.window_words, cfg.window_stride, cfg.max_turns) for p in prompts]
        return self._detect_units(units, "prompt")

    def detect_leak(self, text: str, about: Sequence[str] = ()) -> Detection:
        """Check a generated answer for forget content (names, similarity to forget answers/texts); ``about``: the
        targets its conversation is about (:attr:`Detection.about` of the prompt), whose name variants count as
        their names and whose stored facts are leaks even without a name."""
        return self.detect_leak_batch([text], [about])[0]

    def detect_leak_batch(self, texts: Sequence[str], about: Sequence[Sequence[str]] | None = None) -> list[Detection]:
        """Output check for many generated texts with one encoder call (``about``: per text, as in detect_leak)."""
        cfg = self.config
        if about is not None and len(about) != len(texts):
            raise ValueError(f"about has {len(about)} entries for {len(texts)} texts; give one list of target ids per text")
        return self._detect_units([text_units(t, cfg.window_words, cfg.window_stride) for t in texts], "leak", about)

    def stated_facts(self, text: str, about: Sequence[str]) -> list[str]:
        """The targets among ``about`` whose stored facts or identifying values ``text`` states (entity match only,
        no encoder): how the guard checks its own instruction, which names the target on purpose. The targets'
        own name parts are masked first: a target's full name is also stored as one of its facts (the answer to
        a nameless question about it), and an instruction that names the target it guards states no fact."""
        snap = self.store.snapshot()
        own = {tok for tid in about if (num := snap.num_of.get(tid)) is not None
               for tok in snap.targets[num].name_token_set()}
        toks = ["\x00" if tok in own else tok for tok in skeleton_tokens(normalize(text))]
        hits = snap.matcher.match_tokens(toks, facts=set(about))
        return [tid for tid in dict.fromkeys(about) if tid in hits and (hits[tid].fact or hits[tid].value)]

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the detector to a directory atomically (see :mod:`detectors.persistence`)."""
        return save_detector(self, path)

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder | None = None) -> Detector:
        """Load a detector directory, verifying format version and checksums."""
        parts = read_detector(path, encoder)
        return cls(parts.store, parts.config, parts.models, meta=parts.meta)


def load_detector(path: str | Path, encoder: Encoder | None = None) -> Detector:
    """Load a detector directory (verified first); ``encoder`` defaults to the one named in its config."""
    return Detector.load(path, encoder)
