"""The calibrated robustness table: each method, plain and with each optimiser-level option, mixed to one retain
score, then attacked.

Methods differ in how much utility they give up, and an attack's recovery depends on how far a model moved: a
method that barely moved looks robust. Following the model-mixing calibration of Q. Wang et al. ("Towards
Effective Evaluations and Comparison for LLM Unlearning Methods", ICLR 2025), every unlearned model is first
mixed with the model it started from, ``(1 - a) * theta_target + a * theta_unlearned``, with ``a`` binary-searched
(:func:`training.mixing.calibrate_mixing`) so that its retain score reaches one shared level; the forget fact
rate is then read before and after each weight attack (relearning on request facts, out-of-domain fine-tuning,
4- and 8-bit quantization) on held-out unseen facts, with the recovery ratio of :func:`eval.compare.attack_recovery`.

Information parity: the retain score that sets ``a`` is measured on *calibration* retain questions, held-out
retain people's questions that are not in any evaluated set; the table's retain column is measured on the
evaluated (c) retain set, which calibration never saw.

Deviations from the paper: the shared level is ``retain_ratio`` times the target model's own calibration score
(the paper fixes a level per benchmark); a model already at or above it keeps ``a = 1`` (mixing only moves towards
the target, it cannot lower retention), and the row says so (``a`` column).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field, field_validator

from core.models import LoadedLLM
from core.schema import ForgetTask, QAItem

log = logging.getLogger(__name__)

PLAIN = "plain"
DEFAULT_ATTACKS = ["relearn", "ood-finetune", "quantize-4bit", "quantize-8bit"]


class RobustnessConfig(BaseModel):
    """Which methods and optimiser options go into the calibrated robustness table, and how they are matched."""

    methods: list[str] = Field(default_factory=lambda: ["rmu", "npo", "simnpo", "wga"],
                               description="Unlearning methods (training.methods).")
    options: list[str] = Field(default_factory=lambda: [PLAIN, "sam", "hybrid", "gru"],
                               description="'plain' (the method's own AdamW) and names of training.optim presets.")
    attacks: list[str] = Field(default_factory=lambda: list(DEFAULT_ATTACKS),
                               description="Weight attacks run on every mixed model.")
    retain_ratio: float = Field(0.9, gt=0, le=1, description="The shared retain level, as a share of the target "
                                                             "model's calibration retain score.")
    calib_items: int = Field(16, ge=4, description="Held-out retain questions, outside every evaluated set, that "
                                                   "set the mixing weight.")
    mix_tol: float = Field(0.03, gt=0, lt=1, description="Binary-search resolution of the mixing weight a.")
    mix_iter: int = Field(5, ge=1, le=12)

    @field_validator("options")
    @classmethod
    def _known_options(cls, v: list[str]) -> list[str]:
        if all(o == PLAIN for o in v):
            return v
        from training.optim import OPTIM_PRESETS

        bad = [o for o in v if o != PLAIN and o not in OPTIM_PRESETS]
        if bad:
            raise ValueError(f"unknown robustness option(s) {bad}; accepted: {[PLAIN, *sorted(OPTIM_PRESETS)]}")
        return v


def variant_name(method: str, option: str) -> str:
    """The row and cache name of a method run with an optimiser option (``rmu`` plain, ``rmu+sam``)."""
    return method if option == PLAIN else f"{method}+{option}"


def variant_params(method_params: dict[str, Any], option: str) -> dict[str, Any]:
    """UnlearnConfig fields of a variant: the method's own fields with the option's ``optim`` preset on top."""
    if option == PLAIN:
        return dict(method_params)
    from training.optim import OPTIM_PRESETS

    optim = {**method_params.get("optim", {}), **OPTIM_PRESETS[option]}
    return {**method_params, "optim": optim}


def calibration_items(split: Any, evaluated: Sequence[str], n: int, seed: int) -> list[QAItem]:
    """Held-out retain questions that no evaluated set contains (by question text), a seeded sample of ``n``."""
    import random

    seen = set(evaluated)
    pool = [q for q in split.negatives.get("retain", []) if q.question not in seen]
    if len(pool) < 4:
        raise ValueError(f"only {len(pool)} held-out retain questions lie outside the evaluated sets; the mixing "
                         f"calibration needs at least 4 (lower max_retain, or use a task with more retain people)")
    rng = random.Random(f"{seed}:mix-calibration")
    return sorted(rng.sample(pool, min(n, len(pool))), key=lambda q: q.question)


class RobustnessRow(BaseModel):
    """One method variant, mixed to the shared retain level, before and after each attack."""

    method: str
    option: str
    a: float = Field(description="The mixing weight (1: the unlearned model itself).")
    reached: bool = Field(description="False when even the target model misses the level (a = 0).")
    calib_retain: float
    retain_rouge_c: float | None
    fact_rate: float | None = Field(description="Forget fact rate of the mixed model on the attacked items.")
    attacked: dict[str, float | None] = Field(default_factory=dict)
    recovery: dict[str, float | None] = Field(default_factory=dict)
    request_fact_rate: float | None = Field(None, description="The same on the request's facts outside the relearn "
                                                              "sample (what the method was asked to forget).")
    request_attacked: dict[str, float | None] = Field(default_factory=dict)
    request_recovery: dict[str, float | None] = Field(default_factory=dict)
    train_seconds: float | None = None
    seconds: float = 0.0


def _fact_rate_on(llm: LoadedLLM, items: Sequence[QAItem], facts: Sequence[list[str]], tokens: int,
                  batch: int) -> float | None:
    """Greedy answers of a bare model to ``items``, scored by the fact rate."""
    from eval.metrics.columns import fact_rate
    from eval.systems import model_system

    return fact_rate(model_system("m", llm).answer([q.question for q in items], tokens, batch), facts)


VariantFn = Callable[[str, str], tuple[LoadedLLM, float | None]]  # (method, option) -> unlearned model, train s


def request_items_outside_relearn(request: ForgetTask, attack_params: dict[str, dict[str, Any]]) -> list[QAItem]:
    """The request's forget facts the relearning attack does not train on: scoring them too shows whether
    relearning some facts brings back the others (the relearning protocol of Hu et al., arXiv 2406.13356, and
    Fan et al., arXiv 2502.05374), on facts every method was asked to forget, not only on held-out ones."""
    from eval.attacks import make_attack

    relearn = make_attack("relearn", attack_params.get("relearn"))
    used = {q.question for q in relearn.training_items(request)}
    return [q for q in relearn.pool(request) if q.question not in used]


def robustness_rows(cfg: RobustnessConfig, target: LoadedLLM, variant: VariantFn,
                    request: ForgetTask, items: Sequence[QAItem], facts: Sequence[list[str]],
                    calib: Sequence[QAItem], retain_eval: Sequence[QAItem],
                    rouge: Callable[[list[str], list[str]], Any], attack_params: dict[str, dict[str, Any]],
                    max_new_tokens: int = 32, batch_size: int = 32,
                    on_row: Callable[[list[RobustnessRow], dict], None] | None = None,
                    request_items: Sequence[QAItem] = (), request_facts: Sequence[list[str]] = ()
                    ) -> tuple[list[RobustnessRow], dict]:
    """Train (or reuse) each variant, mix it to the shared retain level and attack it, one row at a time
    (``on_row`` sees the rows so far, so a long run leaves a partial table); returns the rows and shared figures.
    ``items`` are held-out facts; ``request_items`` (optional) the request's facts outside the relearn sample,
    scored the same way into the row's ``request_*`` fields."""
    from tqdm.auto import tqdm

    from eval.attacks import attack_recovery, make_attack
    from eval.attacks.weights import copy_llm
    from eval.systems import model_system
    from training.mixing import calibrate_mixing

    def retain_score(model: Any) -> float:
        llm = copy_llm(target, model=model, source="mixed")
        answers = model_system("mixed", llm).answer([q.question for q in calib], max_new_tokens, batch_size)
        return float(rouge(answers, [q.answer for q in calib]).value)

    def rates(llm: LoadedLLM) -> tuple[float | None, float | None]:
        """Fact rates on the held-out items and on the request items outside the relearn sample."""
        return (_fact_rate_on(llm, items, facts, max_new_tokens, batch_size),
                _fact_rate_on(llm, request_items, request_facts, max_new_tokens, batch_size) if request_items else None)

    target_calib = retain_score(target.model)
    level = cfg.retain_ratio * target_calib
    upper: dict[str, float | None] = {}
    upper_request: dict[str, float | None] = {}
    for name in cfg.attacks:  # the original under the same attack where it applies, else its plain answers
        attack = make_attack(name, attack_params.get(name))
        llm = attack.apply(target, request) if "original" in attack.applies_to else target
        upper[name], upper_request[name] = rates(llm)
    target_rates = rates(target)
    shared = {"target_calib_retain": target_calib, "level": level, "upper_fact_rate": upper,
              "target_fact_rate": target_rates[0], "calib_items": len(calib), "attacked_items": len(items),
              "request_items": len(request_items), "upper_request_fact_rate": upper_request,
              "target_request_fact_rate": target_rates[1]}
    rows: list[RobustnessRow] = []
    pairs = [(m, o) for m in cfg.methods for o in cfg.options]
    for method, option in tqdm(pairs, desc="robustness rows"):
        llm, train_s = variant(method, option)
        t0 = time.perf_counter()
        work = copy.deepcopy(target.model)  # left holding the calibrated mixture
        mix = calibrate_mixing(target.model, llm.model, retain_score, level, tol=cfg.mix_tol, max_iter=cfg.mix_iter,
                               work=work)
        mixed = copy_llm(target, model=work, source=f"{variant_name(method, option)} mixed a={mix.a:.3f}")
        plain, plain_request = rates(mixed)
        answers = model_system("mixed", mixed).answer([q.question for q in retain_eval], max_new_tokens, batch_size)
        row = RobustnessRow(method=method, option=option, a=mix.a, reached=mix.reached, calib_retain=mix.score,
                            retain_rouge_c=float(rouge(answers, [q.answer for q in retain_eval]).value)
                            if retain_eval else None, fact_rate=plain, request_fact_rate=plain_request,
                            train_seconds=train_s)
        for name in cfg.attacks:
            attack = make_attack(name, attack_params.get(name))
            attacked = attack.apply(mixed, request)  # an attacker relearns from the public request
            row.attacked[name], row.request_attacked[name] = rates(attacked)
            row.recovery[name] = (attack_recovery(upper[name], plain, row.attacked[name])
                                  if row.attacked[name] is not None else None)
            if request_items:
                row.request_recovery[name] = (attack_recovery(upper_request[name], plain_request,
                                                              row.request_attacked[name])
                                              if row.request_attacked[name] is not None else None)
            del attacked
        row.seconds = round(time.perf_counter() - t0, 1)
        log.info("robustness %s: a=%.3f fact %.3f -> %s", variant_name(method, option), mix.a, plain or 0,
                 row.attacked)
        rows.append(row)
        if on_row is not None:
            on_row(rows, shared)
        del mixed, llm
    return rows, shared


def robustness_table(rows: Sequence[RobustnessRow], attacks: Sequence[str]) -> list[list[str]]:
    """The rows as a table of strings (header first): mixing weight, retain, fact rate, each attack and recovery;
    then the same on the request facts outside the relearn sample ("(a)"), where the rows have them."""
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    request = any(r.request_fact_rate is not None for r in rows)
    head = ["method", "option", "a", "retain (calib)", "retain_rouge_c", "fact rate"]
    for a in attacks:
        head += [f"{a}", f"{a} recovery"]
    if request:
        head += ["fact rate (a)"] + [h for a in attacks for h in (f"{a} (a)", f"{a} (a) recovery")]
    head += ["train s"]
    out = [head]
    for r in rows:
        line = [r.method, r.option, f"{r.a:.3f}" + ("" if r.reached else " (not reached)"), f(r.calib_retain),
                f(r.retain_rouge_c), f(r.fact_rate)]
        for a in attacks:
            line += [f(r.attacked.get(a)), f(r.recovery.get(a))]
        if request:
            line += [f(r.request_fact_rate)] + [v for a in attacks
                                                for v in (f(r.request_attacked.get(a)), f(r.request_recovery.get(a)))]
        line += ["–" if r.train_seconds is None else f"{r.train_seconds:.0f}"]
        out.append(line)
    return out
