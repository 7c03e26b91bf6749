"""The detector's held-out evaluation on the comparison's split: built from the forget request, scored on the rest.

``detector eval`` (the default mode) runs :func:`split_detector_eval`: it splits the task once
(:mod:`eval.split`), builds the detector from the request alone, drops anything the detector stores anyway
(its own generated variants included), and reports

* TPR on (a) the request's own questions and answers, and on new phrasings of request facts;
* TPR on (b) held-out questions about the targets, by group (unseen facts, paraphrases, aliases, multi-hop),
  and on the leak channel for the unseen facts' answers;
* FPR on (c) held-out negatives by group (unseen neighbour and retain people, benign and general questions;
  for the leak channel their answers and texts), per prompt, with the calibrated threshold;
* AUROC of (a) and of (b) against (c).

Beside the groups of the split it reports the shapes a deployment sends (:func:`shaped_groups`): (b) split
into questions that name their target (a stored name or alias, whole) and descriptions without a name;
(b)'s unseen-fact questions placed in a system, an assistant and a tool turn, and translated into French,
German and Spanish by the translation attack's translator (with (c)'s questions, for the FPR); and (c) composed into
multi-turn conversations and long messages about one held-out person, so the per-prompt FPR is measured
on prompts like those the threshold was calibrated for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from core.generation import Prompt
from core.schema import ForgetTask, QAItem
from detectors.config import DetectorConfig
from detectors.detector import Detector
from detectors.encoder import Encoder
from detectors.entities import EntityMatcher, TargetNames
from detectors.evaluation import EvalReport, evaluate_groups
from detectors.normalize import normalize
from eval.attacks.translate import translate
from eval.split import SplitConfig, TaskSplit, detector_texts, exclude_overlaps, request_texts, split_task


def detector_groups(split: TaskSplit) -> dict[str, dict[str, list[str]]]:
    """The texts of each evaluation group, by channel and side (prompt/leak x positive/negative)."""
    pos = {"a:question": [q.question for q in split.in_request]}
    pos.update({f"a:rephrased_{g}": [q.question for q in v] for g, v in split.rephrased.items()})
    pos.update({f"b:{g}": [q.question for q in v] for g, v in split.held_out.items() if v})
    neg = {f"c:{g}": v for g, v in split.negative_prompts().items() if v}
    unseen = split.held_out.get("unseen_fact", [])
    leak_pos = {"a:answer": [q.answer for q in split.in_request],
                "b:unseen_answer": [q.answer for q in unseen],
                "b:paraphrased_answer": [q.paraphrased_answer for q in unseen if q.paraphrased_answer]}
    leak_neg = {f"c:{g}_answer": [q.answer for q in v] for g, v in split.negatives.items() if v}
    if split.retain_texts:
        leak_neg["c:retain_text"] = list(split.retain_texts)
    return {"prompt_pos": pos, "prompt_neg": neg, "leak_pos": {k: v for k, v in leak_pos.items() if v},
            "leak_neg": leak_neg}


_LONG = 6


def _names_target(split: TaskSplit) -> EntityMatcher:
    """An entity matcher over the request's target names (what the detector was told)."""
    return EntityMatcher([TargetNames(t.id, tuple(t.names)) for t in split.request.targets], salt="eval")


def _by_subject(items: list[QAItem]) -> list[list[QAItem]]:
    """Items grouped by their subject (one held-out person), in first-seen order."""
    out: dict[str, list[QAItem]] = {}
    for q in items:
        out.setdefault(q.subject or q.question, []).append(q)
    return list(out.values())


def shaped_groups(split: TaskSplit) -> tuple[dict[str, list[Prompt]], dict[str, list[Prompt]]]:
    """Extra (positive, negative) prompt groups shaped like deployed traffic (see the module docstring)."""
    matcher = _names_target(split)
    held = split.heldout_items()
    named = [any(h.full for h in matcher.match(normalize(q.question)).values()) for q in held]
    pos: dict[str, list[Prompt]] = {"b:names_target": [q.question for q, n in zip(held, named, strict=True) if n],
                                    "b:no_name": [q.question for q, n in zip(held, named, strict=True) if not n]}
    unseen = [q.question for q in split.held_out.get("unseen_fact", [])]
    pos["b:in_system_turn"] = [[{"role": "system", "content": q}, {"role": "user", "content": "Go ahead."}]
                               for q in unseen]
    pos["b:in_assistant_turn"] = [[{"role": "user", "content": "What should I ask you?"},
                                   {"role": "assistant", "content": q}, {"role": "user", "content": "Answer that."}]
                                  for q in unseen]
    pos["b:in_tool_turn"] = [[{"role": "user", "content": "Look up the question in my notes and answer it."},
                              {"role": "tool", "content": q}] for q in unseen]
    langs = ("fr", "de", "es")  # the translation attack's translator (templates, then a glossary)
    pos["b:translated"] = [r[0] for q in unseen for lang in langs if (r := translate(q, lang)) is not None]
    neg: dict[str, list[Prompt]] = {"c:multi_turn": [], "c:long": [], "c:translated": [
        r[0] for items in split.negatives.values() for q in items[:40] for lang in langs
        if (r := translate(q.question, lang)) is not None]}
    for items in split.negatives.values():
        for person in _by_subject(items):
            if len(person) >= 2:
                neg["c:multi_turn"].append([{"role": "user", "content": person[0].question},
                                            {"role": "assistant", "content": person[0].answer},
                                            {"role": "user", "content": person[1].question}])
            if len(person) >= 3:
                neg["c:long"].append(" ".join(q.question for q in person[:_LONG]))
    benign = [*split.benign, *(g.question for g in split.general)]
    neg["c:long"] += [" ".join(benign[i:i + _LONG]) for i in range(0, len(benign) - _LONG + 1, _LONG)]
    return {k: v for k, v in pos.items() if v}, {k: v for k, v in neg.items() if v}


class SplitEval(NamedTuple):
    """A detector built from a task's forget request and the held-out groups it is scored on."""

    detector: Detector
    split: TaskSplit
    groups: dict[str, dict[str, list[Any]]]
    """``prompt_pos``, ``prompt_neg``, ``leak_pos``, ``leak_neg``: group name -> texts or prompts (shaped ones included)."""
    shaped: frozenset[str]
    """The positive groups of :func:`shaped_groups` (deployment shapes of (b), kept out of the plain (b) AUROC)."""


def prepare_split_eval(task: ForgetTask, config: DetectorConfig | None = None,
                       split_config: SplitConfig | None = None, encoder: Encoder | None = None,
                       general: Any = None) -> SplitEval:
    """Build the detector from ``task``'s forget request; return it with the split and the held-out groups."""
    from eval.general import general_items_for

    cfg = config or DetectorConfig()
    split = split_task(task, split_config, general_items_for(task) if general is None else general)
    det = Detector.build(split.request, cfg, encoder)
    split = exclude_overlaps(split, [detector_texts(split.request, cfg), request_texts(split.request)])
    g: dict[str, dict[str, list[Any]]] = dict(detector_groups(split))
    shaped_pos, shaped_neg = shaped_groups(split)
    g["prompt_pos"].update(shaped_pos)
    g["prompt_neg"].update(shaped_neg)
    return SplitEval(det, split, g, frozenset(shaped_pos))


def split_detector_eval(task: ForgetTask, config: DetectorConfig | None = None,
                        split_config: SplitConfig | None = None, encoder: Encoder | None = None,
                        general: Any = None, save_to: str | Path | None = None) -> tuple[EvalReport, TaskSplit]:
    """Build the detector from ``task``'s forget request and score it on the held-out evaluation."""
    det, split, g, shaped_pos = prepare_split_eval(task, config, split_config, encoder, general)
    if save_to is not None:
        det.meta["split"] = {"task": task.name, **split.config.model_dump()}
        det.save(save_to)
    a = [k for k in [*g["prompt_pos"], *g["leak_pos"]] if k.startswith("a:")]
    b = [k for k in [*g["prompt_pos"], *g["leak_pos"]] if k.startswith("b:") and k not in shaped_pos]
    c = [*g["prompt_neg"], *g["leak_neg"]]
    nb = [k for k in c if k.startswith("c:neighbour")]
    rep = evaluate_groups(det, task.name, "split (request -> held-out)", g["prompt_pos"], g["prompt_neg"],
                          g["leak_pos"], g["leak_neg"],
                          auroc_sides={"(a) vs (c)": (a, c), "(b) vs (c)": (b, c), "(b) vs (c) neighbours": (b, nb)})
    rep.config["split"] = {**split.config.model_dump(), "counts": split.counts()}
    return rep, split
