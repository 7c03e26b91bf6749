"""Worst-case forget sets: judge a method on the forget subset that is hardest for it to erase, not a random one.

Follows C. Fan et al., "Challenging Forgets: Unveiling the Worst-Case Forget Sets in Machine Unlearning" (arXiv
2403.07362; reference code OPTML-Group/Unlearn-WorstCase, ``data-wise/main_selmu.py`` and
``data-wise/unlearn/impl.py::optimize_select``). The bi-level problem selects data weights ``w`` in
``{0 <= w <= 1, sum w = k}``: the lower level unlearns the weighted forget set from the original model, the upper
level minimises ``sum_i w_i * loss_i(theta*(w)) + gamma * ||w||^2``, the forget loss of each pool item after
unlearning, i.e. it puts weight on the items the unlearned model still knows. Each round reloads the model, runs
the lower level, takes one projected gradient step on ``w`` with the items' losses as the (first-order) gradient,
and projects onto the capped simplex by bisection; the selection is the top-``k`` of the final ``w``.

Here the pool is the forget request's trained QA items (kind ``fact``), the lower level is the method itself
(any registered objective, unchanged), and ``loss_i`` is the answer NLL of item ``i`` (teacher-forced, mean over
answer tokens). Deviations, each for this harness: (1) the lower level cannot weight examples inside 19 different
losses, so it trains on each item ``1 + round(w_i * (copies - 1))`` times: every item at least once, because an
item the lower level skips keeps its low loss only for being skipped, and the first-order step would then select
exactly the skipped items (measured: with ``round(w_i * copies)`` RMU's second round selected the 5 items it had
not trained on); the first round, at uniform ``w``, is the method's ordinary run on the whole request, shared with
the comparison's cache; (2) the losses are z-scored
before the step so that one ``w_lr`` fits every method's loss scale (the reference tunes ``w_lr`` per model); (3)
two rounds by default instead of the reference's tens of epochs, because each round is a whole unlearning run on
a CPU. Texts are not split into subsets: a subset request carries only its QA items.

Evaluation (:func:`subset_rows`): the method unlearns the worst-case subset and a seeded random subset of the same
size, each from the target model; both are scored on their own items' questions (a), on the held-out rephrasings
of those same facts, and on held-out retain and neighbour people (c), beside the target model on the same items.
Nothing evaluated is selected on: the selection reads only the request's own training items.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from core.models import LoadedLLM
from core.schema import ForgetTask, QAItem

log = logging.getLogger(__name__)


class WorstCaseConfig(BaseModel):
    """The worst-case selector's settings (see the module docstring for each one's role)."""

    methods: list[str] = Field(default_factory=lambda: ["rmu", "npo"], description="Methods judged (comparison).")
    k: int = Field(5, ge=1, description="Size of the selected forget subset (QA items).")
    rounds: int = Field(2, ge=1, le=20, description="Bi-level rounds: lower-level unlearning runs per method.")
    w_lr: float = Field(0.5, gt=0, description="Step size of the upper level on z-scored losses.")
    gamma: float = Field(0.0, ge=0, description="L2 weight on w (the reference's gamma).")
    copies: int = Field(3, ge=1, le=10, description="Times an item of weight 1 is trained on in the lower level "
                                                    "(weight 0: once).")
    seed: int = 0


class Selection(BaseModel):
    """What the selector chose for one method, with the weights and losses of every round."""

    method: str
    k: int
    pool: list[str] = Field(description="Pool questions, in request order.")
    worst: list[str]
    random: list[str]
    weights: list[list[float]] = Field(default_factory=list, description="w after each round.")
    losses: list[list[float]] = Field(default_factory=list, description="Per-item NLL after each round's unlearning.")
    seconds: float = 0.0


def project_capped_simplex(w: Sequence[float], k: float, iters: int = 60) -> list[float]:
    """Euclidean projection of ``w`` onto ``{0 <= w_i <= 1, sum w = k}``: ``clip(w - mu, 0, 1)``, mu by bisection."""
    n = len(w)
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in (0, {n}] for a pool of {n} items")
    lo, hi = min(w) - 1.0, max(w)
    for _ in range(iters):
        mu = (lo + hi) / 2
        if sum(min(1.0, max(0.0, x - mu)) for x in w) > k:
            lo = mu
        else:
            hi = mu
    mu = (lo + hi) / 2
    return [min(1.0, max(0.0, x - mu)) for x in w]


def item_nll(llm: LoadedLLM, items: Sequence[QAItem], system: str | None = None) -> list[float]:
    """Each item's answer NLL under ``llm`` (mean over answer tokens, chat-templated question): low = still known."""
    from eval.metrics.scoring import score_answers

    scores = score_answers(llm.model, llm.tokenizer, [q.question for q in items], [q.answer for q in items],
                           system=system)
    return [-s.mean_logprob() for s in scores]


def pool_items(request: ForgetTask) -> list[QAItem]:
    """The selector's pool: the request's trained forget QA (kind ``fact``), in request order."""
    return [q for t in request.targets for q in t.qa if q.kind == "fact"]


def subset_request(request: ForgetTask, counts: dict[str, int]) -> ForgetTask:
    """The request restricted to the pool items in ``counts`` (question -> times trained on); texts dropped."""
    targets = []
    for t in request.targets:
        qa = [q for q in t.qa for _ in range(counts.get(q.question, 0))]
        targets.append(t.model_copy(update={"qa": qa, "texts": [], "mcq": []}))
    if not any(t.qa for t in targets):
        raise ValueError("the subset holds no forget item; nothing to unlearn")
    return request.model_copy(update={"targets": [t for t in targets if t.qa]})


def subset_tag(questions: Sequence[str]) -> str:
    """A short stable tag of a subset, for cache directory names."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(questions)).encode()).hexdigest()[:10]


UnlearnFn = Callable[[ForgetTask, str, str], LoadedLLM]  # (request, method, cache name) -> unlearned model


def select_worst_case(cfg: WorstCaseConfig, method: str, request: ForgetTask, unlearn_fn: UnlearnFn,
                      full_run_name: str | None = None) -> Selection:
    """Run the bi-level selection for ``method``; ``unlearn_fn`` unlearns a (sub)request from the target model."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    pool = pool_items(request)
    n = len(pool)
    if cfg.k >= n:
        raise ValueError(f"k={cfg.k} must be smaller than the pool of {n} forget QA items, or there is no choice")
    if len({q.question for q in pool}) < n:
        raise ValueError("the request's forget QA repeat a question; the selector keys items by question")
    w = [cfg.k / n] * n
    sel = Selection(method=method, k=cfg.k, pool=[q.question for q in pool], worst=[], random=[])
    for r in tqdm(range(cfg.rounds), desc=f"worst-case {method}"):
        counts = {q.question: 1 + round(wi * (cfg.copies - 1)) for q, wi in zip(pool, w, strict=True)}
        uniform = r == 0 and len(set(counts.values())) == 1
        if uniform:  # the first round at uniform w is the method's ordinary run on the whole request
            counts = {q: 1 for q in counts}
        name = full_run_name if uniform and full_run_name else \
            f"worst-{method}-{subset_tag([f'{q}#{c}' for q, c in counts.items()])}"
        model = unlearn_fn(subset_request(request, counts) if not uniform else request, method, name)
        losses = item_nll(model, pool)
        mean = sum(losses) / n
        sd = (sum((x - mean) ** 2 for x in losses) / n) ** 0.5 or 1.0
        z = [(x - mean) / sd for x in losses]
        w = project_capped_simplex([wi - cfg.w_lr * (zi + 2 * cfg.gamma * wi) for wi, zi in zip(w, z, strict=True)],
                                   cfg.k)
        sel.losses.append([round(x, 4) for x in losses])
        sel.weights.append([round(x, 4) for x in w])
        log.info("worst-case %s round %d: NLL %s -> w %s", method, r + 1, sel.losses[-1], sel.weights[-1])
        del model
    top = sorted(range(n), key=lambda i: (-w[i], sel.losses[-1][i]))[: cfg.k]
    sel.worst = [pool[i].question for i in sorted(top)]
    rng = random.Random(f"{cfg.seed}:random-forget-set:{cfg.k}")
    sel.random = [pool[i].question for i in sorted(rng.sample(range(n), cfg.k))]
    sel.seconds = round(time.perf_counter() - t0, 1)
    return sel


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.casefold()).strip()


class SubsetRow(BaseModel):
    """One method on one forget subset: fact rates before (target) and after, and utility on held-out people."""

    method: str
    subset: str
    k: int
    fact_rate_a: float | None = Field(description="The subset's own questions, after unlearning it.")
    fact_rate_rephrased: float | None = Field(description="Held-out rephrasings of the subset's facts.")
    target_fact_rate_a: float | None = Field(description="The target model on the same questions (before).")
    target_fact_rate_rephrased: float | None
    nll_a: float = Field(description="Mean answer NLL of the subset's items after unlearning it (higher: more erased).")
    target_nll_a: float = Field(description="The same, under the target model.")
    retain_rouge_c: float | None
    neighbour_rouge_c: float | None
    n_rephrased: int = 0
    train_seconds: float | None = None


def subset_rows(selection: Selection, request: ForgetTask, target: LoadedLLM, unlearn_fn: UnlearnFn,
                task: ForgetTask, rephrased: Sequence[QAItem], retain_eval: Sequence[QAItem],
                neighbour_eval: Sequence[QAItem], rouge: Callable[[list[str], list[str]], Any],
                max_new_tokens: int = 32, batch_size: int = 32,
                seconds_of: Callable[[str], float | None] | None = None) -> list[SubsetRow]:
    """Unlearn the worst-case and the random subset from the target and score both on what they hold out."""
    from eval.metrics.columns import fact_rate, item_facts
    from eval.systems import model_system

    by_q = {q.question: q for q in pool_items(request)}

    def facts_rate(llm: LoadedLLM, items: Sequence[QAItem]) -> float | None:
        if not items:
            return None
        answers = model_system("m", llm).answer([q.question for q in items], max_new_tokens, batch_size)
        return fact_rate(answers, item_facts(task, items))

    def rouge_of(llm: LoadedLLM, items: Sequence[QAItem]) -> float | None:
        if not items:
            return None
        answers = model_system("m", llm).answer([q.question for q in items], max_new_tokens, batch_size)
        return float(rouge(answers, [q.answer for q in items]).value)

    rows = []
    for label, questions in (("worst-case", selection.worst), ("random", selection.random)):
        items = [by_q[q] for q in questions]
        answers = {_norm(q.answer) for q in items}
        reph = [q for q in rephrased if _norm(q.answer) in answers]
        name = f"subset-{selection.method}-{subset_tag(questions)}"
        model = unlearn_fn(subset_request(request, dict.fromkeys(questions, 1)), selection.method, name)
        rows.append(SubsetRow(method=selection.method, subset=label, k=len(items),
                              fact_rate_a=facts_rate(model, items), fact_rate_rephrased=facts_rate(model, reph),
                              target_fact_rate_a=facts_rate(target, items),
                              target_fact_rate_rephrased=facts_rate(target, reph),
                              nll_a=round(sum(item_nll(model, items)) / len(items), 4),
                              target_nll_a=round(sum(item_nll(target, items)) / len(items), 4),
                              retain_rouge_c=rouge_of(model, retain_eval),
                              neighbour_rouge_c=rouge_of(model, neighbour_eval), n_rephrased=len(reph),
                              train_seconds=seconds_of(name) if seconds_of else None))
        del model
    return rows


def subset_table(rows: Sequence[SubsetRow]) -> list[list[str]]:
    """The rows as a table of strings (header first)."""
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    out = [["method", "forget set", "k", "fact rate (a) before", "fact rate (a) after", "answer NLL (a) before",
            "answer NLL (a) after", "rephrased before", "rephrased after", "n rephrased", "retain_rouge_c",
            "neighbour_rouge_c", "train s"]]
    for r in rows:
        out.append([r.method, r.subset, str(r.k), f(r.target_fact_rate_a), f(r.fact_rate_a), f(r.target_nll_a),
                    f(r.nll_a),
                    f(r.target_fact_rate_rephrased), f(r.fact_rate_rephrased), str(r.n_rephrased),
                    f(r.retain_rouge_c), f(r.neighbour_rouge_c),
                    "–" if r.train_seconds is None else f"{r.train_seconds:.0f}"])
    return out
