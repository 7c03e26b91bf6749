"""One comparison for both approaches: the guard, unlearned weights and both combined, same request, held-out scores.

``run_comparison(CompareConfig)`` walks the whole path:

1. load the task and split it once (:mod:`eval.split`) into the *forget request*, the only thing any system
   receives, and the held-out *evaluation*: (a) the request's own forget questions, (b) held-out questions
   about the same targets, (c) held-out negatives (unseen neighbour and retain people, benign questions,
   general knowledge);
2. fine-tune the target (every fact, plus replay of the base model's own answers to general prompts so it
   keeps what it knew) and the retain reference (all but the forget targets), or reuse them from the cache;
3. build the detector from the request and unlearn the request with each method;
4. drop from the evaluation anything a system holds anyway, and check it (``report.json`` ``parity``: 0);
5. score every system on (a), (b) and (c), run every attack that applies, and write the report.

Every stage is timed; fine-tuned and unlearned models are reused when their config and data are unchanged.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.config import save_config
from core.models import LoadedLLM, load_llm, run_dir
from core.schema import ForgetTask, QAItem
from eval.attacks.base import attack_recovery
from eval.metrics.columns import (
    C_SETS,
    COLUMNS,
    MIN_MIA_UNITS,
    AnswerSheet,
    fact_rate,
    item_facts,
    mean_or_none,
    rouge_or_none,
    sheet_columns,
)
from eval.report import MetricSpec, Report, ReportTable, Sample, write_report
from eval.robustness import RobustnessConfig
from eval.split import HELDOUT_GROUPS, SplitConfig, TaskSplit
from eval.systems import (
    RESPONSE_SOURCES,
    GeneratorName,
    Response,
    System,
    VLLMEngines,
    check_generator,
    generator_label,
    guarded_system,
    model_system,
)
from eval.worst_case import WorstCaseConfig

log = logging.getLogger(__name__)

class CompareConfig(BaseModel):
    """What to compare and how much of it; ``profile`` sets the sizes (``default`` fits 10 min warm)."""

    task: str = "offline"
    base_model: str = "smollm2-135m-instruct"
    target_model: str | None = Field(None, description="A fine-tuned model dir; None fine-tunes (or reuses) one.")
    retain_model: str | None = Field(None, description="The retain model dir; None fine-tunes (or reuses) one.")
    methods: list[str] = Field(default_factory=lambda: ["rmu", "npo"])
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                     description="Per-method UnlearnConfig fields, e.g. {rmu: {train: {max_steps: 30}}}.")
    guard_with: list[str] = Field(default_factory=lambda: ["rmu"], description="Methods also run behind the guard.")
    guard: dict[str, Any] = Field(default_factory=dict, description="GuardConfig fields.")
    trained_guard: bool = Field(False, description="Also run a guard model fine-tuned on the request's guard pairs "
                                                   "(train-guard, cached) as the row 'guard (trained)'.")
    guard_sft: dict[str, Any] = Field(default_factory=dict, description="GuardSFTConfig fields of the trained guard.")
    detector: dict[str, Any] = Field(default_factory=dict, description="DetectorConfig fields.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="How the request and evaluation are cut.")
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig fields for target and retain.")
    target_from: Literal["base", "retain"] = Field(
        "base", description="'base': target and retain model both fine-tuned from the base model (TOFU's protocol); "
                            "'retain': the target continues from the retain model on the forget facts plus a sample "
                            "of retain facts and general data: a third of the cost, but measured on the offline "
                            "benchmark it forgot most retain facts (fact rate 0.60 -> 0.23) and half the base "
                            "model's general knowledge, so it is not the default.")
    target_retain_mix: int = Field(48, ge=0, description="Retain facts replayed in the target stage (target_from=retain).")
    target_finetune: dict[str, Any] = Field(
        default_factory=lambda: {"train": {"lr": 2e-4, "epochs": 3, "batch_size": 8, "warmup_ratio": 0.05,
                                           "save_every": 25}, "replay": 16, "general_qa": 64},
        description="FinetuneConfig fields of the target stage on top of `finetune` (target_from=retain): three "
                    "epochs, and as much general data as forget and retain facts together (measured: with a quarter "
                    "as much, this stage halved the retain model's general-knowledge accuracy).")
    attacks: list[str] | None = Field(None, description="Attack names; None runs every registered attack.")
    attack_params: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"linear-probe": {"max_items": 50}, "ood-finetune": {"steps": 10}},
        description="Per-attack config fields; the default profile trains the probe on 50 retain questions and "
                    "fine-tunes out of domain for 10 steps (the full profile: the attacks' defaults).")
    forget_kinds: list[str] = Field(default_factory=lambda: ["fact", "knowmem"],
                                    description="QA kinds scored as forget questions (MUSE's verbmem is not a question).")
    max_forget: int | None = Field(None, ge=1, description="(a) items evaluated (None: all).")
    max_heldout: int = Field(8, ge=1, description="(b) items evaluated per group (unseen_fact, paraphrase, ...).")
    max_retain: int = Field(10, ge=1, description="(c) held-out retain questions evaluated.")
    max_neighbour: int = Field(10, ge=1, description="(c) held-out neighbour questions evaluated.")
    max_benign: int = Field(8, ge=1, description="(c) held-out benign questions evaluated.")
    max_general: int = Field(24, ge=1, description="(c) general-knowledge questions evaluated.")
    max_attack_items: int = Field(6, ge=1, description="(b) unseen facts each prompt attack is applied to.")
    max_mixed: int = Field(6, ge=0, description="Mixed prompts per kind (joint, step, neighbour; 0: none).")
    mixed_guard_modes: list[Literal["llm", "template", "refuse"]] = Field(
        default_factory=lambda: ["llm", "template", "refuse"],
        description="Guard modes scored on the mixed prompts; the configured mode is the 'guard' row, the others "
                    "are rows 'guard (<mode>)'.")
    mode_rows: bool = Field(False, description="Also make those other modes rows of the main table and the prompt "
                                               "attacks (their leak rate, over-refusal and attack figures).")
    variants_per_item: int = Field(1, ge=1, description="Attack variants kept per item (seeded sample).")
    max_new_tokens: int = Field(32, ge=4)
    generator: GeneratorName = Field(
        "transformers", description="What generates the systems' greedy answers: 'transformers' "
                                    "(core.generation.generate, the guard's transformers backend) or 'vllm' (the "
                                    "guard's in-process vLLM backend, fp32, for targets, guard models and attacked "
                                    "weights; needs the vllm extra).")
    vllm_engines: int = Field(3, ge=1, description="generator=vllm: engines running at once, one per model (each "
                                                   "holds a 2 GiB KV cache on CPU, VLLM_CPU_KVCACHE_SPACE); when "
                                                   "another is needed they all stop (eval.systems.VLLMEngines).")
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict,
                                        description="generator=vllm: further vllm.LLM arguments (e.g. max_model_len).")
    mcq_format: Literal["letter", "cloze"] = Field(
        "cloze", description="MCQ scoring: 'letter' (lm-eval's WMDP format, for models of WMDP's size) or 'cloze' "
                             "(each choice's text, length-normalised: small models sit at chance with letters).")
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    out: str = "runs/compare"
    robustness: RobustnessConfig | None = Field(
        None, description="Also build the calibrated robustness table: each method plain and with each optimiser "
                          "option (training.optim presets), mixed to one retain score, then weight-attacked "
                          "(eval.robustness). Hours on a CPU for the default 4 x 4 variants.")
    worst_case: WorstCaseConfig | None = Field(
        None, description="Also judge methods on the worst-case forget subset beside a random one (eval.worst_case).")
    profile: Literal["default", "full", "all-methods"] = Field(
        "default", description="'full': more items, the main methods and the trained guard; 'all-methods': 'full' "
                               "with every registered unlearning method (hours on a CPU).")


# Every method and attack, more items. Sized from measured runs on the 2-core CPU (warm cache).
FULL_PROFILE: dict[str, Any] = {
    "methods": ["rmu", "r2mu", "tru", "npo", "simnpo", "graddiff", "ga", "idknll"],
    "guard_with": ["rmu", "npo"], "max_heldout": 24, "max_retain": 40, "max_neighbour": 40, "max_benign": 30,
    "max_general": 120, "max_attack_items": 12, "variants_per_item": 1, "max_new_tokens": 40, "attack_params": {},
    "max_mixed": 12, "trained_guard": True, "mode_rows": True,
}


def _sample(items: Sequence[Any], n: int | None, seed: int | str) -> list[Any]:
    """A seeded sample of at most ``n`` items, in their original order."""
    if n is None or n >= len(items):
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def mia_units(forget: Sequence[str], holdout: Sequence[str],
              min_units: int = MIN_MIA_UNITS) -> tuple[list[str], list[str]]:
    """The member/non-member units for Min-K% AUC: the texts, or their sentences when either side is too small."""
    if min(len(forget), len(holdout)) >= min_units:
        return list(forget), list(holdout)

    def sentences(texts: Sequence[str]) -> list[str]:
        return [x.strip() for t in texts for x in re.split(r"(?<=[.!?])\s+", t) if len(x.split()) >= 3]

    return sentences(forget), sentences(holdout)


class _Stage:
    """Times a named stage into ``timings`` and logs it."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> _Stage:
        log.info("stage: %s", self.name)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.name] = round(self.timings.get(self.name, 0.0) + time.perf_counter() - self.t0, 2)


def ensure_finetuned(cfg: CompareConfig, task: ForgetTask, which: str, retain: LoadedLLM | None = None) -> LoadedLLM:
    """Load the fine-tuned target/retain model, fine-tuning (or reusing a cached run) when none is given.

    Both see the whole task (the world before any forget request). The retain model learns all but the forget
    targets' facts from the base model. The target learns every fact: with ``target_from="retain"`` it continues
    from the retain model on the forget facts plus a seeded sample of retain facts (so it keeps them), else from
    the base model on everything (TOFU's recipe, twice the cost). Every stage replays the model's own answers to
    general prompts (:func:`training.finetune.replay_pairs`), so general knowledge survives.
    """
    from eval.general import general_training_qa, replay_prompts
    from eval.tasks.offline import retain_training_qa, training_qa
    from training.finetune import FinetuneConfig, finetune

    given = cfg.target_model if which == "target" else cfg.retain_model
    if given:
        return load_llm(given)
    out = run_dir(task.name, which)
    start = cfg.base_model
    items = training_qa(task) if which == "target" else retain_training_qa(task)
    if which == "target" and cfg.target_from == "retain":
        if retain is None:
            raise ValueError("target_from='retain' needs the retain model first")
        start = str(retain.path)
        kept = {q.question for q in retain_training_qa(task)}
        forget = [q for q in items if q.question not in kept]
        items = forget + _sample([q for q in items if q.question in kept], cfg.target_retain_mix, f"{cfg.seed}:mix")
    llm = load_llm(start)
    extra = cfg.target_finetune if which == "target" and cfg.target_from == "retain" else {}
    fcfg = FinetuneConfig.model_validate({"model": start, **cfg.finetune, **extra})
    finetune(llm.model, llm.tokenizer, items, fcfg, out, desc=f"finetune {which}", replay=replay_prompts(),
             general=general_training_qa())
    return load_llm(str(out))


def ensure_trained_guard(cfg: CompareConfig, request: ForgetTask) -> LoadedLLM:
    """The guard model fine-tuned on the forget request's guard pairs (the request only: no evaluated question is
    trained on), reused from the cache when config and pairs are unchanged."""
    from training.guard_sft import GuardSFTConfig, guard_sft, make_guard_pairs

    scfg = GuardSFTConfig.model_validate(cfg.guard_sft)
    llm = load_llm(scfg.model)
    out = run_dir(request.name, "guard-sft")
    guard_sft(llm.model, llm.tokenizer, request, make_guard_pairs(request, scfg.data), scfg, out)
    return load_llm(str(out))


def _unlearned(cfg: CompareConfig, request: ForgetTask, method: str, target_path: str, name: str | None = None,
               params: dict[str, Any] | None = None) -> LoadedLLM:
    """Unlearn the forget request with ``method`` from the target model (or reuse the cached run) and load it;
    ``name`` is the cache entry (default ``unlearn-<method>``), ``params`` UnlearnConfig fields (default the
    method's ``method_params``)."""
    from training.unlearn import UnlearnConfig, unlearn

    llm = load_llm(target_path)
    fields = cfg.method_params.get(method, {}) if params is None else params
    ucfg = UnlearnConfig.model_validate({"method": method, "model": target_path, **fields})
    out = run_dir(request.name, name or f"unlearn-{method}")
    unlearn(llm.model, llm.tokenizer, request, ucfg, out)
    return load_llm(str(out))


def _train_seconds(request: ForgetTask, name: str) -> float | None:
    """The training time a cached unlearning run recorded (None if it has none)."""
    import json

    f = run_dir(request.name, name) / "train_result.json"
    return round(float(json.loads(f.read_text())["seconds"]), 1) if f.exists() else None


def _robustness_section(cfg: CompareConfig, rcfg: RobustnessConfig, ev: _Eval, target: LoadedLLM, target_path: str,
                        weight_items: list[QAItem], timings: dict[str, float]) -> tuple[ReportTable, dict[str, Any]]:
    """Train every (method, option) variant, mix each to the shared retain level and attack it (eval.robustness)."""
    from eval.robustness import (
        calibration_items,
        request_items_outside_relearn,
        robustness_rows,
        robustness_table,
        variant_name,
        variant_params,
    )

    request = ev.split.request
    evaluated = [p for ps in ev.prompt_sets().values() for p in ps if isinstance(p, str)]
    calib = calibration_items(ev.split, evaluated, rcfg.calib_items, cfg.seed)

    def variant(m: str, opt: str) -> tuple[LoadedLLM, float | None]:
        name = f"unlearn-{variant_name(m, opt)}"
        with _Stage(timings, f"robustness: unlearn {variant_name(m, opt)}"):
            llm = _unlearned(cfg, request, m, target_path, name, variant_params(cfg.method_params.get(m, {}), opt))
        return llm, _train_seconds(request, name)

    def partial(rows: list[Any], shared: dict[str, Any]) -> None:  # a long run leaves what it has measured
        from core.io import atomic_write_json

        atomic_write_json(Path(cfg.out) / "robustness.partial.json",
                          {"shared": shared, "rows": [r.model_dump(mode="json") for r in rows], "timings": timings})

    left = request_items_outside_relearn(request, cfg.attack_params)
    with _Stage(timings, "robustness: total (training included)"):
        rows, shared = robustness_rows(rcfg, target, variant, request, weight_items, item_facts(ev.task, weight_items),
                                       calib, ev.sets["c:retain"], ev.rouge, cfg.attack_params, cfg.max_new_tokens,
                                       cfg.batch_size, on_row=partial, request_items=left,
                                       request_facts=item_facts(ev.task, left))
    legend = (f"every variant mixed with the target, (1-a) target + a unlearned, a binary-searched so that its "
              f"ROUGE-L on {shared['calib_items']} calibration retain questions (held-out retain people, in no "
              f"evaluated set) reaches {rcfg.retain_ratio:g} x the target's {shared['target_calib_retain']:.3f} = "
              f"{shared['level']:.3f} (a=1: already at or above it); fact rate on {shared['attacked_items']} held-out "
              f"unseen facts (target: {shared['target_fact_rate']}), before and after each attack; recovery = "
              f"(attacked - plain) / (upper - plain) with upper the target under the same attack where it applies "
              f"({shared['upper_fact_rate']}); retain_rouge_c on the evaluated (c) retain set; the '(a)' columns: the same "
              f"on the {shared['request_items']} request facts outside the relearn sample, which every method was "
              f"asked to forget (target: {shared['target_request_fact_rate']}, upper "
              f"{shared['upper_request_fact_rate']})")
    table = ReportTable(title="Calibrated robustness: methods x optimiser options, mixed to one retain score",
                        legend=legend, rows=robustness_table(rows, rcfg.attacks))
    return table, {"shared": shared, "rows": [r.model_dump(mode="json") for r in rows]}


def _worst_case_section(cfg: CompareConfig, wcfg: WorstCaseConfig, ev: _Eval, target: LoadedLLM, target_path: str,
                        holds: Callable[[str], str | None],
                        timings: dict[str, float]) -> tuple[ReportTable, dict[str, Any]]:
    """Select each method's worst-case forget subset and score it beside a random one (eval.worst_case)."""
    from eval.worst_case import select_worst_case, subset_rows, subset_table

    request = ev.split.request

    def unlearn_fn(req: ForgetTask, method: str, name: str) -> LoadedLLM:
        return _unlearned(cfg, req, method, target_path, name)

    rephrased = [q for q in ev.split.rephrased.get("paraphrase", []) if holds(q.question) is None]
    rows, selections = [], []
    for m in wcfg.methods:
        with _Stage(timings, f"worst-case: select {m}"):
            sel = select_worst_case(wcfg, m, request, unlearn_fn, full_run_name=f"unlearn-{m}")
        with _Stage(timings, f"worst-case: evaluate {m}"):
            rows += subset_rows(sel, request, target, unlearn_fn, ev.task, rephrased, ev.sets["c:retain"],
                                ev.sets["c:neighbour"], ev.rouge, cfg.max_new_tokens, cfg.batch_size,
                                seconds_of=lambda name: _train_seconds(request, name))
        selections.append(sel.model_dump(mode="json"))
    legend = (f"each method unlearns a forget subset of k={wcfg.k} of the request's QA items from the target: the "
              f"worst case chosen by {wcfg.rounds} bi-level round(s) (arXiv 2403.07362: the items the unlearned "
              f"model still knows best), and a seeded random subset; fact rate on the subset's own questions (a) "
              f"and on held-out rephrasings of the same facts, before (target) and after; the mean answer NLL of "
              f"the subset's items (teacher-forced; higher: more erased); utility on held-out retain and "
              f"neighbour people (c)")
    table = ReportTable(title="Worst-case vs random forget set", legend=legend, rows=subset_table(rows))
    return table, {"selections": selections, "rows": [r.model_dump(mode="json") for r in rows]}


def _rouge_fn(task: ForgetTask) -> tuple[Callable[[Sequence[str], Sequence[str]], Any], str]:
    """The task's ROUGE-L: MUSE's F1 without stemming on MUSE tasks, TOFU's stemmed recall elsewhere."""
    from eval.metrics import rouge_l_f1, rouge_l_recall

    if task.meta.get("source") == "muse":
        return rouge_l_f1, "ROUGE-L F1, no stemming (MUSE)"
    return rouge_l_recall, "ROUGE-L recall, stemmed (TOFU)"


class _Eval:
    """Answers and scores every system on the split's fixed, sampled item sets."""

    def __init__(self, cfg: CompareConfig, split: TaskSplit) -> None:
        self.cfg, self.split, self.task = cfg, split, split.task
        kinds = set(cfg.forget_kinds)
        self.sets: dict[str, list[QAItem]] = {
            "a": _sample([q for q in split.in_request if q.kind in kinds], cfg.max_forget, cfg.seed)}
        for g in HELDOUT_GROUPS:
            pool = split.held_out.get(g, [])
            if g in ("unseen_fact", "paraphrase"):
                pool = [q for q in pool if q.kind in kinds]
            self.sets[f"b:{g}"] = _sample(pool, cfg.max_heldout, f"{cfg.seed}:{g}")
        self.sets["c:neighbour"] = _sample(split.negatives.get("neighbour", []), cfg.max_neighbour, cfg.seed)
        self.sets["c:retain"] = _sample([q for q in split.negatives.get("retain", []) if q.kind in kinds],
                                        cfg.max_retain, cfg.seed)
        self.benign = _sample(split.benign, cfg.max_benign, cfg.seed)
        self.general = _sample(split.general, cfg.max_general, cfg.seed)
        self.facts = {k: item_facts(self.task, v) for k, v in self.sets.items() if k == "a" or k.startswith("b:")}
        self.rouge, self.rouge_name = _rouge_fn(self.task)
        members = [t for tg in split.request.targets if tg.kind in ("privacy", "copyright") for t in tg.texts]
        self.mia_texts = mia_units(members, split.holdout_texts)
        self.answers: dict[str, dict[str, list[Response]]] = {}
        self.details: dict[str, dict[str, Any]] = {}

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_sets(self, general_only: bool = False) -> dict[str, list[str]]:
        """Every evaluated prompt by set: a, b:<group>, c:neighbour, c:retain, c:benign, c:general."""
        out = {} if general_only else {k: [q.question for q in v] for k, v in self.sets.items()}
        if not general_only:
            out["c:benign"] = list(self.benign)
        out["c:general"] = [g.question for g in self.general]
        return out

    def counts(self) -> dict[str, int]:
        """Items evaluated per set."""
        return {k: len(v) for k, v in self.prompt_sets().items()}

    def plain(self, system: str) -> dict[str, Response]:
        """A system's plain answers by question (sets a and b)."""
        out: dict[str, Response] = {}
        for k, items in self.sets.items():
            if k == "a" or k.startswith("b:"):
                out.update(zip([q.question for q in items], self.answers.get(system, {}).get(k, []), strict=False))
        return out

    # -- scoring ---------------------------------------------------------------------------------
    def generation_metrics(self, sys: System, general_only: bool = False) -> dict[str, float | None]:
        """Metrics from greedy answers to every set (only the general set for the base-model reference row)."""
        from eval.general import general_accuracy
        from eval.metrics import extract_reasoning

        sets = self.prompt_sets(general_only)
        flat = [p for ps in sets.values() for p in ps]
        resp = sys.respond(flat, self.cfg.max_new_tokens, self.cfg.batch_size)
        ans: dict[str, list[Response]] = {}
        start = 0
        for k, ps in sets.items():
            ans[k], start = resp[start:start + len(ps)], start + len(ps)
        self.answers[sys.name] = ans
        text = {k: [r.shown for r in v] for k, v in ans.items()}
        reasoning = {k: [r.reasoning or extract_reasoning(r.text) for r in v] for k, v in ans.items()}
        flagged = ({k: [float(bool(r.trace and r.trace.flagged)) for r in v] for k, v in ans.items()}
                   if sys.guarded is not None else None)
        sheet = AnswerSheet(text=text, refs={k: [q.answer for q in v] for k, v in self.sets.items()}, facts=self.facts,
                            rouge=self.rouge, flagged=flagged, sources=[r.source for r in resp], reasoning=reasoning,
                            general=lambda answers: general_accuracy(answers, self.general).value if self.general else None)
        for col in sheet_columns(sys.guarded is not None):
            if general_only and col.name != "general_acc_c":
                continue
            sheet.values[col.name] = col.compute(sheet)  # type: ignore[misc]
        m = sheet.values
        if general_only:
            return m
        b_keys = sheet.b_sets
        detail: dict[str, Any] = {"forget_fact_rate_b_by_group": {k[2:]: sheet.fact_rate([k]) for k in b_keys}}
        if flagged is not None:
            detail["guard_fpr_c_by_group"] = {k[2:]: mean_or_none(flagged[k]) for k in C_SETS}
            detail["guard_sources_by_set"] = {k: {s: [r.source for r in v].count(s)
                                                  for s in RESPONSE_SOURCES}
                                              for k, v in ans.items()}
        self.details[sys.name] = detail
        return m

    def white_box_metrics(self, llm: LoadedLLM) -> tuple[dict[str, float | None], dict[str, Any]]:
        """Teacher-forced metrics of a model's weights; also returns raw values needed across systems."""
        from eval.metrics import mcq_accuracy, mia_auc, min_k_prob, truth_ratio_score, truth_ratios

        m: dict[str, float | None] = {}
        raw: dict[str, Any] = {}
        for key, items in (("a", self.sets["a"]), ("b", self.sets["b:unseen_fact"])):
            tr_items = [q for q in items if q.paraphrased_answer and q.perturbed_answers]
            if tr_items:
                ratios = truth_ratios(llm, None, tr_items)
                raw[f"truth_ratios_{key}"] = ratios
                m[f"truth_ratio_{key}"] = truth_ratio_score(ratios, "forget").value
        for key, items in (("a", self.split.request_mcq), ("b", self.split.heldout_mcq)):
            if items:
                m[f"hazard_mcq_{key}"] = mcq_accuracy(llm, None, items, format=self.cfg.mcq_format).value
        if self.split.retain_mcq:
            m["retain_mcq_acc"] = mcq_accuracy(llm, None, self.split.retain_mcq, format=self.cfg.mcq_format).value
        members, non_members = self.mia_texts
        if members and non_members:
            auc = mia_auc(min_k_prob(llm, None, members), min_k_prob(llm, None, non_members))
            m["mia_auc"] = auc.value
            raw["auc"] = auc.value
        tofu = self.tofu_utility(llm)
        if tofu is not None:
            m["tofu_model_utility"] = tofu
        return m, raw

    def tofu_utility(self, llm: LoadedLLM) -> float | None:
        """TOFU's model utility on held-out retain people and TOFU's real_authors/world_facts (TOFU tasks only)."""
        from eval.metrics.qa import tofu_utility

        if self.task.meta.get("source") != "tofu":
            return None
        retain = [q for q in self.sets["c:retain"] if q.paraphrased_answer and q.perturbed_answers]
        ra = [q for q in self.task.retain_qa if q.kind == "real_authors" and q.perturbed_answers]
        wf = [q for q in self.task.retain_qa if q.kind == "world_facts" and q.perturbed_answers]
        if not (retain and ra and wf):
            return None
        return tofu_utility(llm, None, retain, ra, wf, max_new_tokens=self.cfg.max_new_tokens).value

    def attacked(self, sys: System, sets: dict[str, tuple[list[Any], list[QAItem]]]) -> dict[str, dict[str, Any]]:
        """Fact rate and ROUGE-L under each attack (its prompts and the items they attack), one batched call."""
        prompts = [p for ps, _ in sets.values() for p in ps]
        out = sys.answer(prompts, self.cfg.max_new_tokens, self.cfg.batch_size, desc=f"{sys.name} under attack")
        values, start = {}, 0
        for name, (ps, items) in sets.items():
            ans, start = out[start:start + len(ps)], start + len(ps)
            values[name] = {"fact_rate": fact_rate(ans, item_facts(self.task, items)) if ps else None,
                            "rouge": rouge_or_none(self.rouge, ans, [q.answer for q in items]), "n": len(ps)}
        return values

    def plain_scores(self, system: str, items: Sequence[QAItem]) -> dict[str, float | None]:
        """Fact rate and ROUGE-L of a system's plain answers to the very items an attack was scored on."""
        plain = self.plain(system)
        if not items or any(q.question not in plain for q in items):
            return {"fact_rate": None, "rouge": None}
        ans = [plain[q.question].shown for q in items]
        return {"fact_rate": fact_rate(ans, item_facts(self.task, items)),
                "rouge": rouge_or_none(self.rouge, ans, [q.answer for q in items])}


def _prompt_attack_sets(cfg: CompareConfig, ev: _Eval, names: list[str],
                        holds: Callable[[str], str | None]) -> tuple[dict[str, tuple[list[Any], list[QAItem]]],
                                                                     dict[str, int]]:
    """For each prompt attack: the attacked prompts (a seeded sample of variants per item) and the items they
    attack, built from the evaluated (b) unseen privacy facts; prompts a system holds are dropped and counted."""
    from eval.attacks import make_attack, run_prompt_attack

    task = ev.task
    people = {t.name.casefold() for t in task.targets if t.kind == "privacy"}
    pool = [q for q in ev.sets["b:unseen_fact"] if (q.subject or "").casefold() in people]
    items = _sample(pool, cfg.max_attack_items, cfg.seed)
    sets, dropped = {}, {}
    for name in names:
        attack = make_attack(name, cfg.attack_params.get(name))
        attacked = run_prompt_attack(attack, items, task)
        rng = random.Random(f"{cfg.seed}:{name}")
        by_item: dict[str, list[Any]] = {}
        for ap in attacked:
            by_item.setdefault(ap.question, []).append(ap)
        kept = [ap for group in by_item.values() for ap in rng.sample(group, min(cfg.variants_per_item, len(group)))]
        fresh = [ap for ap in kept if holds(ap.text()) is None]
        if len(fresh) < len(kept):
            dropped[name] = len(kept) - len(fresh)
        sets[name] = ([ap.prompt for ap in fresh], [ap.item for ap in fresh])
    return sets, dropped


def _mixed_suite(cfg: CompareConfig, ev: _Eval, systems: Sequence[System], extra: Sequence[System],
                 holds: Callable[[str], str | None]) -> tuple[dict[str, dict[str, dict[str, float | None]]],
                                                             list[dict[str, Any]], int]:
    """Answer the mixed prompts (:mod:`eval.mixed`) with every system and score them per kind; also returns the
    prompts with each system's answer (for the report's details) and how many prompts were dropped as held."""
    from eval.mixed import build_mixed, score_mixed

    neighbours = ev.sets["c:neighbour"]
    built = build_mixed(ev.sets["b:unseen_fact"], ev.facts["b:unseen_fact"], ev.general, neighbours,
                        item_facts(ev.task, neighbours), cfg.max_mixed, cfg.seed)
    items = [it for it in built if holds(it.prompt) is None]
    if not items:
        return {}, [], len(built)
    tokens = 2 * cfg.max_new_tokens  # two parts to answer
    bare = systems[0].answer([it.benign_prompt for it in items], tokens, cfg.batch_size,
                             desc="mixed: benign parts alone")
    scores: dict[str, dict[str, dict[str, float | None]]] = {}
    answers: dict[str, list[Response]] = {}
    for sys in [*systems, *extra]:
        t0 = time.perf_counter()
        answers[sys.name] = sys.respond([it.prompt for it in items], tokens, cfg.batch_size,
                                        desc=f"{sys.name}: mixed prompts")
        per_prompt = (time.perf_counter() - t0) / len(items)  # batched: the systems' relative cost, same run
        scores[sys.name] = score_mixed(items, [r.shown for r in answers[sys.name]], bare, ev.rouge)
        for kind in scores[sys.name].values():
            kind["s_per_prompt"] = round(per_prompt, 3)
    rows = [{"kind": it.kind, "prompt": it.prompt, "forget_facts": it.forget_facts, "benign_prompt": it.benign_prompt,
             "bare_benign_answer": bare[i],
             "answers": {n: {"text": rs[i].shown, "source": rs[i].source} for n, rs in answers.items()}}
            for i, it in enumerate(items)]
    return scores, rows, len(built) - len(items)


def run_comparison(cfg: CompareConfig) -> tuple[Report, dict[str, Path]]:
    """Run the whole comparison and write the report; returns the report and its file paths."""
    check_generator(cfg.generator)  # before anything is trained
    engines = VLLMEngines(cfg.vllm_engines, engine_kwargs=cfg.vllm_kwargs) if cfg.generator == "vllm" else None
    try:
        return _compare(cfg, engines)
    finally:
        if engines is not None:
            engines.close()


def _compare(cfg: CompareConfig, engines: VLLMEngines | None) -> tuple[Report, dict[str, Path]]:
    """The comparison of :func:`run_comparison`, its systems answering through ``engines`` (vLLM) when given."""
    from detectors.config import DetectorConfig
    from detectors.detector import Detector
    from eval.attacks import attack_names, make_attack
    from eval.general import general_items_for
    from eval.metrics import forget_quality, privleak
    from eval.split import _Index, detector_texts, exclude_overlaps, parity_check, request_texts, split_task
    from eval.tasks.spec import load_task_spec
    from guard.config import GuardConfig

    if cfg.profile in ("full", "all-methods"):
        from training.methods import METHODS

        profile = {**FULL_PROFILE, **({"methods": METHODS.names()} if cfg.profile == "all-methods" else {})}
        cfg = cfg.model_copy(update={k: v for k, v in profile.items() if k not in cfg.model_fields_set})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "compare_config.yaml")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    notes: list[str] = []

    with _Stage(timings, "task + split"):
        task = load_task_spec(cfg.task)
        split = split_task(task, cfg.split, general_items_for(task))
        request = split.request
    with _Stage(timings, "finetune retain"):
        retain = ensure_finetuned(cfg, task, "retain")
    with _Stage(timings, "finetune target"):
        target = ensure_finetuned(cfg, task, "target", retain)
    target_path = str(target.path)
    dcfg = DetectorConfig.model_validate(cfg.detector)
    with _Stage(timings, "detector build"):
        detector = Detector.build(request, dcfg)
    unlearned: dict[str, LoadedLLM] = {}
    for m in cfg.methods:
        with _Stage(timings, f"unlearn {m}"):
            unlearned[m] = _unlearned(cfg, request, m, target_path)

    # ---- information parity: nothing evaluated may be held by a system ---------------------------------
    stores = [detector_texts(request, dcfg), request_texts(request, "unlearners")]
    split = exclude_overlaps(split, stores)
    holds = _Index(stores).hit

    gcfg = GuardConfig.model_validate(cfg.guard)
    systems: list[System] = [model_system("original", target, "original", engines),
                             guarded_system("guard", target, detector, request, gcfg, engines=engines)]
    mode_guards = [guarded_system(f"guard ({m})", target, detector, request, gcfg.model_copy(update={"guard_mode": m}),
                                  engines=engines)
                   for m in dict.fromkeys(cfg.mixed_guard_modes) if m != gcfg.guard_mode]
    if cfg.mode_rows:
        systems += mode_guards
    if cfg.trained_guard:
        with _Stage(timings, "train guard"):
            tuned_guard = ensure_trained_guard(cfg, request)
        systems.append(guarded_system("guard (trained)", target, detector, request,
                                      gcfg.model_copy(update={"guard_mode": "llm"}), guard_llm=tuned_guard,
                                      engines=engines))
    systems += [model_system(m, unlearned[m], "weights", engines) for m in cfg.methods]
    systems += [guarded_system(f"guard+{m}", unlearned[m], detector, request, gcfg, kind="guard+weights",
                               engines=engines)
                for m in cfg.guard_with if m in unlearned]
    reference = model_system("retain (reference)", retain, "reference", engines)
    base = model_system("base (reference)", load_llm(cfg.base_model), "reference", engines)

    ev = _Eval(cfg, split)
    values: dict[str, dict[str, float | None]] = {}
    raws: dict[str, dict[str, Any]] = {}
    for sys in [*systems, reference]:
        with _Stage(timings, "metrics: generation"):
            values[sys.name] = dict(ev.generation_metrics(sys))
        if sys.white_box:
            with _Stage(timings, "metrics: white-box"):
                wb, raws[sys.name] = ev.white_box_metrics(sys.llm)
            values[sys.name].update(wb)
    with _Stage(timings, "metrics: generation"):
        values[base.name] = dict(ev.generation_metrics(base, general_only=True))
    ref_raw = raws.get(reference.name, {})
    for sys in [*systems, reference]:
        raw = raws.get(sys.name)
        if not raw:
            continue
        for key in ("a", "b"):
            if f"truth_ratios_{key}" in raw and f"truth_ratios_{key}" in ref_raw:
                values[sys.name][f"forget_quality_{key}"] = forget_quality(raw[f"truth_ratios_{key}"],
                                                                           ref_raw[f"truth_ratios_{key}"]).value
        if "auc" in raw and "auc" in ref_raw:
            try:
                values[sys.name]["privleak"] = privleak(raw["auc"], ref_raw["auc"]).value
            except ValueError as e:  # the reference separates forget from holdout perfectly: no ratio to take
                values[sys.name]["privleak"] = None
                if not any(n.startswith("privleak undefined") for n in notes):
                    notes.append(f"privleak undefined: {e} (reference Min-K% AUC {ref_raw['auc']:.3f}).")

    # ---- mixed prompts: a forget part and a benign part in one prompt ---------------------------------
    extra_guards = [] if cfg.mode_rows else mode_guards
    mixed: dict[str, dict[str, dict[str, float | None]]] = {}
    mixed_rows: list[dict[str, Any]] = []
    if cfg.max_mixed:
        with _Stage(timings, "mixed prompts"):
            mixed, mixed_rows, mixed_dropped = _mixed_suite(cfg, ev, systems, extra_guards, holds)
        if mixed_dropped:
            notes.append(f"mixed prompts dropped because a system holds them: {mixed_dropped}.")
    del extra_guards, mode_guards

    # ---- attacks -------------------------------------------------------------------------------
    wanted = cfg.attacks if cfg.attacks is not None else attack_names()
    prompt_names = [a for a in wanted if a in attack_names("prompt")]
    weight_names = [a for a in wanted if a in attack_names("weights")]
    probe_names = [a for a in wanted if a in attack_names("probe")]
    attack_values: dict[str, dict[str, float | None]] = {s.name: {} for s in systems}
    attack_details: dict[str, dict[str, Any]] = {s.name: {} for s in systems}
    recovery: dict[str, dict[str, float | None]] = {s.name: {} for s in systems}
    with _Stage(timings, "attacks: prepare"):
        psets, dropped = _prompt_attack_sets(cfg, ev, prompt_names, holds)
    if dropped:
        notes.append(f"attack prompts dropped because a system holds them: {dropped}.")
    weight_items = ev.sets["b:unseen_fact"]

    def record(sys: System, name: str, scores: dict[str, Any], items: list[QAItem]) -> None:
        # Recovery: (attacked - plain) / (upper - plain), all on the same items; the upper reference is the
        # original model under the same attack when it was run, else the original's plain answers.
        plain = ev.plain_scores(sys.name, items)
        upper = attack_details["original"].get(name) or ev.plain_scores("original", items)
        value = scores["fact_rate"]
        attack_values[sys.name][name] = value
        attack_details[sys.name][name] = {**scores, "plain_fact_rate": plain["fact_rate"],
                                          "plain_rouge": plain["rouge"],
                                          "upper_fact_rate": upper.get("fact_rate")}
        if sys.kind != "original":
            recovery[sys.name][name] = attack_recovery(upper.get("fact_rate"), plain["fact_rate"], value)

    for sys in systems:
        applicable = {n: psets[n] for n in prompt_names if sys.kind in make_attack(n).applies_to}
        if applicable:
            with _Stage(timings, "attacks: prompt"):
                for name, scores in ev.attacked(sys, applicable).items():
                    record(sys, name, scores, psets[name][1])
        for name in weight_names:
            attack = make_attack(name, cfg.attack_params.get(name))
            if sys.kind not in attack.applies_to or not weight_items:
                continue
            with _Stage(timings, f"attacks: {name}"):
                attacked_llm = attack.apply(sys.llm, request)  # an attacker relearns from the public request
                asys = model_system(f"{sys.name}/{name}", attacked_llm, sys.kind, engines)
                qs = [q.question for q in weight_items]
                record(sys, name, ev.attacked(asys, {name: (qs, weight_items)})[name], weight_items)
                del attacked_llm, asys
        for name in probe_names:
            attack = make_attack(name, cfg.attack_params.get(name))
            if sys.kind in attack.applies_to:
                with _Stage(timings, f"attacks: {name}"):
                    values[sys.name]["probe_accuracy"] = float(attack.score(sys.llm, task).accuracy)

    # ---- optional sections: calibrated robustness, worst-case forget sets ------------------------------
    tables: list[ReportTable] = []
    sections: dict[str, Any] = {}
    if cfg.robustness is not None:
        table, sections["robustness"] = _robustness_section(cfg, cfg.robustness, ev, target, target_path, weight_items, timings)
        tables.append(table)
    if cfg.worst_case is not None:
        table, sections["worst_case"] = _worst_case_section(cfg, cfg.worst_case, ev, target, target_path, holds, timings)
        tables.append(table)

    # ---- the parity check, over everything that was evaluated ---------------------------------------
    extra = {f"attack:{n}": [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in ps]
             for n, (ps, _) in psets.items()}
    extra["mixed"] = [r["prompt"] for r in mixed_rows]
    parity = parity_check(split, stores, extra)
    if parity.total:
        raise RuntimeError(f"information parity violated: {parity.total} evaluated texts are held by a system "
                           f"({parity.overlaps}; e.g. {parity.examples})")

    # ---- report --------------------------------------------------------------------------------
    all_systems = [*systems, reference, base]
    present = [c for c in COLUMNS.in_order() if any(v.get(c.name) is not None for v in values.values())]
    undefined = [k for k in ("forget_fact_rate_a", "forget_rouge_a", "forget_fact_rate_b", "forget_rouge_b")
                 if k not in {c.name for c in present}]
    if undefined:
        notes.append(f"undefined for this task (no {', '.join(cfg.forget_kinds)} QA with a known fact or reference), "
                     f"shown as -: {', '.join(undefined)}.")
    samples = []
    for key, label in (("a", "forget (a)"), ("b:unseen_fact", "held-out (b): unseen fact"),
                       ("b:alias", "held-out (b): alias"), ("c:neighbour", "negative (c): neighbour")):
        for i, q in enumerate(ev.sets.get(key, [])[:2]):
            samples.append(Sample(label=label, prompt=q.question, reference=q.answer,
                                  answers={s: ev.answers[s][key][i].shown for s in ev.answers if key in ev.answers[s]}))
    if ev.benign:
        samples.append(Sample(label="negative (c): benign", prompt=ev.benign[0],
                              answers={s: ev.answers[s]["c:benign"][0].shown for s in ev.answers
                                       if "c:benign" in ev.answers[s]}))
    timings["total"] = round(time.perf_counter() - t_start, 2)
    counts = ev.counts()
    notes += [f"task {task.name}: the split (seed {cfg.split.seed}) gives every system the same forget request: "
              f"{split.counts()['request']}; evaluated (sampled): {counts}.",
              f"information parity: {sum(parity.checked.values())} evaluated texts checked against what the detector "
              f"stores (with its own generated variants) and what the unlearners train on; {parity.total} overlaps. "
              f"Excluded before scoring because a system held them: {split.excluded or 'none'}.",
              f"answers capped at {cfg.max_new_tokens} tokens, greedy; {ev.rouge_name}; fact rate: the question's "
              "fact value stated as whole words (no template floor).",
              _generator_note(cfg, engines),
              f"prompt attacks on {len({q.question for _, its in psets.values() for q in its})} held-out unseen facts "
              f"(b), {cfg.variants_per_item} variant(s) each; weight attacks relearn from the request and are scored "
              f"on {len(weight_items)} held-out unseen facts.",
              "recovery = (attacked - plain) / (upper - plain) on the attacked items, with the original model under "
              "the same attack as the upper reference where it was run (prompt attacks, quantization), else the "
              "original's plain answers; '–' where the system's plain fact rate on those items is not below the "
              "reference's (nothing forgotten there to recover).",
              f"mixed prompts: {len(mixed_rows)} (joint, step, neighbour), each a held-out unseen fact joined with a "
              "held-out benign part; answers capped at twice the plain budget; benign_rouge is ROUGE-L recall against "
              f"the original model's answer to the benign part alone; the 'guard' row runs guard_mode={gcfg.guard_mode}.",
              "white-box metrics (truth ratio, MCQ, MIA, probe) are not applicable to guarded systems: an attacker "
              "with the weights drops the guard; the weights are those of the row without 'guard'.",
              f"detector threshold {detector.threshold:.4f} ({_calibration_note(detector)}); guard_fpr_c is "
              "the per-prompt rate measured on (c).",
              "the retain (reference) row is the model never trained on the forget facts: the target to match; the "
              "base (reference) row is the model before fine-tuning (general knowledge only)."]
    report = Report(
        title=f"unlearn-guard comparison on {task.name} ({cfg.profile} profile)",
        generator=generator_label(cfg.generator, engines.dtype if engines is not None else "float32"),
        systems=[s.name for s in all_systems],
        metrics=[MetricSpec(name=c.name, higher_is_better=c.higher_is_better, description=c.description,
                            ideal=c.ideal, count=c.count) for c in present],
        values=values, attacks=prompt_names + weight_names, attack_values=attack_values, attack_recovery=recovery,
        attack_metric="forget_fact_rate", forget_axis="forget_fact_rate_b", utility_axis="utility_hm",
        details={"systems": ev.details, "attacks": attack_details, "mixed": mixed_rows, **sections},
        tables=tables, samples=samples,
        mixed=mixed, timings=timings, notes=notes,
        split={**split.counts(), "evaluated": counts}, parity=parity.model_dump(mode="json"),
        config=cfg.model_dump(mode="json"))
    return report, write_report(report, out)


def run_sections(cfg: CompareConfig) -> tuple[list[ReportTable], dict[str, Path]]:
    """Only the optional sections configured (``robustness``, ``worst_case``), without the rest of the comparison
    (``unlearn-guard robustness`` and ``worst-case``): same split and cached target, the evaluation sets cleared of
    what the unlearners train on (these sections score weights only). Writes ``<section>.json`` and ``.md`` into
    ``cfg.out``."""
    from core.io import atomic_write_json, atomic_write_text
    from eval.general import general_items_for
    from eval.report import md_table
    from eval.split import _Index, exclude_overlaps, request_texts, split_task
    from eval.tasks.spec import load_task_spec

    if cfg.worst_case is None and cfg.robustness is None:
        raise ValueError("run_sections needs cfg.robustness and/or cfg.worst_case")
    if cfg.generator != "transformers":
        log.warning("generator=%s answers compare's systems; the robustness and worst-case sections generate with "
                    "transformers", cfg.generator)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "compare_config.yaml")
    task = load_task_spec(cfg.task)
    split = split_task(task, cfg.split, general_items_for(task))
    retain = ensure_finetuned(cfg, task, "retain") if cfg.target_from == "retain" else None
    target = ensure_finetuned(cfg, task, "target", retain)
    stores = [request_texts(split.request, "unlearners")]
    split = exclude_overlaps(split, stores)
    ev = _Eval(cfg, split)
    tables, paths = [], {}
    for key, sub in (("robustness", cfg.robustness), ("worst_case", cfg.worst_case)):
        if sub is None:
            continue
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if key == "robustness":
            table, data = _robustness_section(cfg, sub, ev, target, str(target.path), ev.sets["b:unseen_fact"],
                                              timings)
        else:
            table, data = _worst_case_section(cfg, sub, ev, target, str(target.path), _Index(stores).hit, timings)
        timings["total"] = round(time.perf_counter() - t0, 1)
        data = {**data, "timings": timings, "config": sub.model_dump(mode="json"), "split": split.counts()}
        atomic_write_json(out / f"{key}.json", data)
        atomic_write_text(out / f"{key}.md", f"# {table.title}\n\n{table.legend}.\n\n{md_table(table.rows)}\n\n"
                                             + "\n".join(f"- {k}: {v:.1f} s" for k, v in timings.items()) + "\n")
        tables.append(table)
        paths.update({f"{key}.json": out / f"{key}.json", f"{key}.md": out / f"{key}.md"})
    return tables, paths


def _generator_note(cfg: CompareConfig, engines: VLLMEngines | None) -> str:
    """What generated the answers, and what generates with transformers whichever generator is chosen."""
    if engines is None:
        return (f"answers generated by {generator_label(cfg.generator)}; the guarded systems' target and guard "
                "model through the guard's transformers backend.")
    return (f"answers generated by {generator_label(cfg.generator, engines.dtype)}: every system's answers, the "
            f"guard models' decisions, the mixed prompts and the attacked models' answers ({engines.starts} engine "
            f"starts, {engines.start_seconds:.0f} s of them, at most {engines.max_live} engines at once); the "
            "robustness and worst-case sections and TOFU's model utility still generate with transformers.")


def _calibration_note(detector: Any) -> str:
    """What the detector's prompt threshold guarantees, from its calibration report (fakes: their target FPR)."""
    cal = getattr(detector, "calibration", None)
    if isinstance(cal, dict) and "prompt" in cal:
        return cal["prompt"].guarantee_note()
    return f"target FPR {detector.config.target_fpr}"
