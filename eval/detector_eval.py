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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.schema import ForgetTask
from detectors.config import DetectorConfig
from detectors.detector import Detector
from detectors.encoder import Encoder
from detectors.evaluation import EvalReport, evaluate_groups
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


def split_detector_eval(task: ForgetTask, config: DetectorConfig | None = None,
                        split_config: SplitConfig | None = None, encoder: Encoder | None = None,
                        general: Any = None, save_to: str | Path | None = None) -> tuple[EvalReport, TaskSplit]:
    """Build the detector from ``task``'s forget request and score it on the held-out evaluation."""
    from eval.general import general_items_for

    cfg = config or DetectorConfig()
    split = split_task(task, split_config, general_items_for(task) if general is None else general)
    det = Detector.build(split.request, cfg, encoder)
    split = exclude_overlaps(split, [detector_texts(split.request, cfg), request_texts(split.request)])
    if save_to is not None:
        det.meta["split"] = {"task": task.name, **split.config.model_dump()}
        det.save(save_to)
    g = detector_groups(split)
    a = [k for k in [*g["prompt_pos"], *g["leak_pos"]] if k.startswith("a:")]
    b = [k for k in [*g["prompt_pos"], *g["leak_pos"]] if k.startswith("b:")]
    c = [*g["prompt_neg"], *g["leak_neg"]]
    nb = [k for k in c if k.startswith("c:neighbour")]
    rep = evaluate_groups(det, task.name, "split (request -> held-out)", g["prompt_pos"], g["prompt_neg"],
                          g["leak_pos"], g["leak_neg"],
                          auroc_sides={"(a) vs (c)": (a, c), "(b) vs (c)": (b, c), "(b) vs (c) neighbours": (b, nb)})
    rep.config["split"] = {**split.config.model_dump(), "counts": split.counts()}
    return rep, split
