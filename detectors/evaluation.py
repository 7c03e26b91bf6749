"""Held-out evaluation of the detector on a task: cross-fitted, so every reported item was unseen.

For ``folds`` = K, fold f builds a detector from a copy of the task in which

* each target keeps only the facts not assigned to fold f, *without* their paraphrased questions,
  and no alias/multi-hop probes;
* the negatives (neighbour, retain, benign, built-in benign items) of fold f are removed;

and then scores, never having stored or trained on them:

* ``forget_question``: questions of the target's held-out facts (facts it has never seen);
* ``forget_paraphrase``: paraphrased questions of stored facts (their original question is stored);
* ``forget_probe``: alias and multi-hop probes;
* the held-out negatives, by group (``neighbour``, ``retain``, ``benign``, ``builtin_benign``);
* for the leak channel, held-out answers and paraphrased answers vs held-out retain answers/texts.

Each item is tested in exactly one fold; rates pool the folds, each fold with its own threshold.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from core.schema import ForgetTask
from detectors.calibration import auroc
from detectors.config import DetectorConfig
from detectors.detector import Detector
from detectors.encoder import Encoder
from detectors.store import PROBE_KINDS, NegativeItem, _item_hash, task_negatives

log = logging.getLogger(__name__)

POSITIVE_GROUPS = ("forget_question", "forget_paraphrase", "forget_probe")
LEAK_POSITIVE_GROUPS = ("forget_answer_unseen", "forget_paraphrased_answer")


@dataclass
class FoldSplit:
    """One fold: the training task and negatives, and the held-out texts by group."""

    fold: int
    folds: int
    train_task: ForgetTask
    train_negatives: list[NegativeItem]
    pos: dict[str, list[str]] = field(default_factory=dict)
    neg: dict[str, list[str]] = field(default_factory=dict)
    leak_pos: dict[str, list[str]] = field(default_factory=dict)
    leak_neg: dict[str, list[str]] = field(default_factory=dict)


def task_fingerprint(task: ForgetTask) -> str:
    """A short content hash of a task, to check that a detector is evaluated on the task it was split from."""
    return hashlib.sha256(task.model_dump_json().encode("utf-8")).hexdigest()[:16]


def _fold_of(parts: tuple[str, ...], seed: int, folds: int) -> int:
    """The fold of an item, by a seeded hash of its content."""
    return int(_item_hash(parts, seed + 7) * folds)


def split_fold(task: ForgetTask, fold: int, folds: int = 4, seed: int = 0, builtin: bool = True) -> FoldSplit:
    """Split a task for fold ``fold`` of ``folds`` (see the module docstring)."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    split = FoldSplit(fold, folds, task, [])
    pos = {g: [] for g in POSITIVE_GROUPS}
    leak_pos = {g: [] for g in LEAK_POSITIVE_GROUPS}
    targets = []
    for t in task.targets:
        facts = [q for q in t.qa if q.kind not in PROBE_KINDS]
        probes = [q for q in t.qa if q.kind in PROBE_KINDS]
        order = sorted(range(len(facts)), key=lambda i: _item_hash((t.id, facts[i].question), seed))
        fact_fold = {i: rank % folds for rank, i in enumerate(order)}
        kept = []
        for i, q in enumerate(facts):
            f = fact_fold[i]
            if f == fold:
                pos["forget_question"].append(q.question)
                leak_pos["forget_answer_unseen"].append(q.answer)
                continue
            kept.append(q.model_copy(update={"paraphrased_question": None, "paraphrased_answer": None}))
            if f == (fold + 1) % folds:
                if q.paraphrased_question:
                    pos["forget_paraphrase"].append(q.paraphrased_question)
                if q.paraphrased_answer:
                    leak_pos["forget_paraphrased_answer"].append(q.paraphrased_answer)
        for j, q in enumerate(probes):
            if j % folds == fold:
                pos["forget_probe"].append(q.question)
        targets.append(t.model_copy(update={"qa": kept}))
    neg: dict[str, list[str]] = {}
    leak_neg: dict[str, list[str]] = {}
    train_negs = []
    for it in task_negatives(task, builtin):
        if _fold_of((it.group, *it.queries, *it.contents), seed, folds) == fold:
            if it.queries:
                neg.setdefault(it.group, []).extend(it.queries)
            if it.contents:
                leak_neg.setdefault(it.group, []).extend(it.contents)
        else:
            train_negs.append(it)
    split.train_task = task.model_copy(update={"targets": targets})
    split.train_negatives = train_negs
    split.pos, split.neg, split.leak_pos, split.leak_neg = pos, neg, leak_pos, leak_neg
    return split


class GroupResult(BaseModel):
    """Rate of flagged items in one held-out group (TPR for positives, FPR for negatives)."""

    channel: str
    group: str
    positive: bool
    n: int
    flagged: int
    rate: float
    extreme: float = Field(description="Lowest score of a positive group, highest of a negative group.")


class EvalReport(BaseModel):
    """Held-out detector metrics on one task."""

    task: str
    mode: str = Field(description="'cross-fit' (K folds), 'holdout-fold' (one saved fold) or 'in-sample'.")
    folds: int
    target_fpr: float
    groups: list[GroupResult]
    auroc: dict[str, float]
    thresholds: list[float]
    calibration_fpr: list[float]
    seconds: float
    config: dict = Field(default_factory=dict)
    calibration_notes: list[str] = Field(default_factory=list, description="Per built detector and channel: what "
                                         "its threshold guarantees ('not guaranteed: n=...' for small groups).")

    def rate(self, group: str, channel: str = "prompt") -> float:
        """The rate of one group (KeyError when absent)."""
        for g in self.groups:
            if g.group == group and g.channel == channel:
                return g.rate
        raise KeyError(f"no group {group!r} in channel {channel!r}")

    def table(self) -> str:
        """A plain-text metrics table."""
        lines = [f"task {self.task} | {self.mode} ({self.folds} fold(s)) | target FPR {self.target_fpr:g} | "
                 f"thresholds {', '.join(f'{t:.4f}' for t in self.thresholds)}",
                 f"{'channel':8} {'group':28} {'metric':6} {'n':>6} {'flagged':>8} {'rate':>8} {'min/max score':>14}"]
        for g in self.groups:
            lines.append(f"{g.channel:8} {g.group:28} {'TPR' if g.positive else 'FPR':6} {g.n:6d} {g.flagged:8d} "
                         f"{g.rate:8.4f} {g.extreme:14.4f}")
        for k, v in self.auroc.items():
            lines.append(f"AUROC {k:30} {v:.4f}")
        lines += [f"calibration: {n}" for n in dict.fromkeys(self.calibration_notes)]
        return "\n".join(lines)


@dataclass
class _Pool:
    """Scores and flags per (channel, group) pooled over folds."""

    scores: dict[tuple[str, str, bool], list[float]] = field(default_factory=dict)
    flags: dict[tuple[str, str, bool], list[bool]] = field(default_factory=dict)

    def add(self, channel: str, group: str, positive: bool, scores: list[float], flags: list[bool]) -> None:
        """Append one fold's scores and flags for a group."""
        key = (channel, group, positive)
        self.scores.setdefault(key, []).extend(scores)
        self.flags.setdefault(key, []).extend(flags)


def _score_split(det: Detector, split: FoldSplit, pool: _Pool) -> None:
    """Score every held-out group of a split with ``det`` and pool the results."""
    for channel, groups, positive in (("prompt", split.pos, True), ("prompt", split.neg, False),
                                      ("leak", split.leak_pos, True), ("leak", split.leak_neg, False)):
        for g, texts in groups.items():
            if not texts:
                continue
            dets = det.detect_batch(texts) if channel == "prompt" else det.detect_leak_batch(texts)
            pool.add(channel, g, positive, [d.score for d in dets], [d.flagged for d in dets])


def _report(task: ForgetTask, mode: str, folds: int, cfg: DetectorConfig, pool: _Pool, thresholds: list[float],
            cal_fpr: list[float], seconds: float) -> EvalReport:
    """Assemble the report (rates per group, AUROCs) from pooled scores."""
    groups = []
    order = {g: i for i, g in enumerate((*POSITIVE_GROUPS, *LEAK_POSITIVE_GROUPS, "neighbour", "retain", "retain_text",
                                         "benign", "builtin_benign"))}
    for (ch, g, positive), flags in sorted(pool.flags.items(), key=lambda kv: (kv[0][0] != "prompt", not kv[0][2],
                                                                                 order.get(kv[0][1], 99), kv[0][1])):
        sc = pool.scores[(ch, g, positive)]
        groups.append(GroupResult(channel=ch, group=g, positive=positive, n=len(flags), flagged=int(sum(flags)),
                                  rate=float(np.mean(flags)) if flags else float("nan"),
                                  extreme=float(min(sc) if positive else max(sc))))
    au: dict[str, float] = {}
    for ch in ("prompt", "leak"):
        p = [s for (c, _, pos), v in pool.scores.items() if c == ch and pos for s in v]
        n = [s for (c, _, pos), v in pool.scores.items() if c == ch and not pos for s in v]
        if p and n:
            au[f"{ch} (all negatives)"] = auroc(p, n)
        nb = pool.scores.get((ch, "neighbour", False))
        if p and nb:
            au[f"{ch} (neighbour negatives)"] = auroc(p, nb)
    return EvalReport(task=task.name, mode=mode, folds=folds, target_fpr=cfg.target_fpr, groups=groups, auroc=au,
                      thresholds=thresholds, calibration_fpr=cal_fpr, seconds=round(seconds, 2),
                      config=cfg.model_dump())


def evaluate_groups(det: Detector, task_name: str, mode: str, prompt_pos: dict[str, list[str]],
                    prompt_neg: dict[str, list[str]], leak_pos: dict[str, list[str]] | None = None,
                    leak_neg: dict[str, list[str]] | None = None,
                    auroc_sides: dict[str, tuple[list[str], list[str]]] | None = None) -> EvalReport:
    """Score given held-out groups with a built detector: TPR per positive group, FPR per negative group.

    ``auroc_sides`` names extra AUROCs, each over (positive groups, negative groups) of both channels, e.g.
    ``{"(b) vs (c)": ([...], [...])}``; the pooled ones of :func:`cross_validate` are reported too.
    """
    t0 = time.perf_counter()
    split = FoldSplit(0, 1, ForgetTask(name=task_name), [])
    split.pos, split.neg = dict(prompt_pos), dict(prompt_neg)
    split.leak_pos, split.leak_neg = dict(leak_pos or {}), dict(leak_neg or {})
    pool = _Pool()
    _score_split(det, split, pool)
    rep = _report(ForgetTask(name=task_name), mode, 1, det.config, pool, [det.threshold],
                  [det.calibration["prompt"].fpr_calibration], time.perf_counter() - t0)
    rep.calibration_notes = [f"{ch}: {r.guarantee_note()}" for ch, r in det.calibration.items()]
    for label, (pos_groups, neg_groups) in (auroc_sides or {}).items():
        for ch in ("prompt", "leak"):
            p = [x for g in pos_groups for x in pool.scores.get((ch, g, True), [])]
            n = [x for g in neg_groups for x in pool.scores.get((ch, g, False), [])]
            if p and n:
                rep.auroc[f"{ch} {label}"] = auroc(p, n)
    return rep


def cross_validate(task: ForgetTask, config: DetectorConfig | None = None, encoder: Encoder | None = None,
                   folds: int = 4, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Build one detector per fold and report held-out TPR/FPR per group, pooled over folds."""
    cfg = config or DetectorConfig()
    enc = encoder or Encoder.from_config(cfg)
    t0 = time.perf_counter()
    pool = _Pool()
    thresholds, cal_fpr = [], []
    for f in range(folds):
        split = split_fold(task, f, folds, seed, cfg.builtin_benign)
        det = Detector.build(split.train_task, cfg, enc, negatives=split.train_negatives)
        thresholds.append(det.threshold)
        cal_fpr.append(det.calibration["prompt"].fpr_calibration)
        _score_split(det, split, pool)
        if progress:
            progress(f + 1, folds)
    return _report(task, "cross-fit", folds, cfg, pool, thresholds, cal_fpr, time.perf_counter() - t0)


def evaluate_detector(det: Detector, task: ForgetTask) -> EvalReport:
    """Evaluate a built detector: on its held-out fold when it was built with one, else in-sample."""
    t0 = time.perf_counter()
    hold = det.meta.get("holdout")
    pool = _Pool()
    if hold and hold.get("fingerprint") == task_fingerprint(task):
        split = split_fold(task, int(hold["fold"]), int(hold["folds"]), int(hold["seed"]), det.config.builtin_benign)
        mode, folds = "holdout-fold", int(hold["folds"])
    else:
        if hold:
            log.warning("detector was split from another task (fingerprint %s); evaluating in-sample", hold.get("fingerprint"))
        split = FoldSplit(0, 1, task, [])
        split.pos = {"forget_question": [q.question for q in task.forget_qa if q.kind not in PROBE_KINDS],
                     "forget_paraphrase": [q.paraphrased_question for q in task.forget_qa if q.paraphrased_question],
                     "forget_probe": [q.question for q in task.forget_qa if q.kind in PROBE_KINDS]}
        split.leak_pos = {"forget_answer": [q.answer for q in task.forget_qa]}
        for it in task_negatives(task, det.config.builtin_benign):
            if it.queries:
                split.neg.setdefault(it.group, []).extend(it.queries)
            if it.contents:
                split.leak_neg.setdefault(it.group, []).extend(it.contents)
        mode, folds = "in-sample", 1
    _score_split(det, split, pool)
    return _report(task, mode, folds, det.config, pool, [det.threshold],
                   [det.calibration["prompt"].fpr_calibration], time.perf_counter() - t0)
