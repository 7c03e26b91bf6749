"""Bootstrapping unlearning (BS-T, BS-S): suppress the forget answers *and* the model's own beliefs about them.

K. Li, Q. Wang, Y. Wang, F. Li, J. Liu, B. Han, J. Zhou, "LLM Unlearning with LLM Beliefs", ICLR 2026
(arXiv 2510.19422). Reference code: the first author's fork of open-unlearning
(github:kemoulee/open-unlearning, ``src/trainer/unlearn/bst.py`` and ``bss.py``,
``configs/trainer/BST.yaml`` and ``BSS.yaml``; commit 00e1b2c).

The paper's *squeezing effect*: gradient ascent lowers the target token's probability, the softmax
hands that mass to the tokens (and whole answers) the model already finds likely, so paraphrases of
the forgotten answer come out instead. Bootstrapping pushes those high-likelihood regions down too.

- ``bs-t`` (token level). At each answer position ``i`` the target mixes the one-hot forget token
  with the model's own top-k belief, detached (stop-gradient ``sg``):
  ``q_i = softmax(top_k(z_i))`` (logits outside the top ``k`` set to -inf),
  ``t_i = lambda_bst * sg(q_i) + (1 - lambda_bst) * onehot(y_i)``, and the forget loss is the
  ascent-type ``L_BST = mean_seq mean_i <t_i, log pi_theta(. | x, y_<i)>`` (minimising it lowers the
  log-probability of the target and of its likely alternatives). With a GradDiff retain term:
  ``loss = gamma * L_BST + alpha * NLL(retain)``.
- ``bs-s`` (sequence level). ``N`` answers ``y^_j ~ pi(. | x_u)`` are sampled for every forget
  question; the forget loss is ``(1 - lambda_bss) * L(D_u) + lambda_bss * L(D^_u)`` over the original
  forget answers ``D_u`` and the sampled ones ``D^_u``, with ``L`` GA's ascent ``-NLL`` (the reference's
  choice; ``forget_loss="bs-t"`` uses ``L_BST`` instead, a combination the paper also reports), plus
  ``alpha * NLL(retain)``.

Defaults are the reference configs': ``lambda_bst=0.2, top_k=20`` (the paper's ablation also peaks at
0.2), ``lambda_bss=0.5, N=3`` samples at temperature 1, ``gamma=1, alpha=1``, NLL retain.

Deviations:
- BS-S is *off-policy*: the answers are sampled once, from the original model before training, and
  cached as JSONL under the cache root (keyed by the weights, questions and sampling settings). The
  reference re-samples from the current model every 2 epochs (on-policy); the paper's analysis
  (Theorem 5.3) is for the off-policy form. Fixed streams keep runs fingerprinted, resumable and
  deterministic, and re-sampling would dominate a CPU run's time.
- The reference samples answers only for the forget batch that is current when it regenerates and
  reuses that one augmented batch; here every forget question gets ``N`` samples, a stream of its own
  paired with the forget batches.
- Answers are cut at 32 new tokens (reference: 200): the offline task's answers are one sentence
  (about 15 tokens), TOFU's are paragraphs; longer samples would mostly be run-on text after the answer.
  At ``temperature=0`` (greedy) one answer per question is kept, since all ``N`` would be equal.
- Train defaults (lr 1e-5 like ``ga``, 30 constant steps, no warm-up) are set for the embedded 135M
  model; the paper trains 1B-8B models for several epochs at 1e-5. Both objectives are unbounded below,
  like GA. Not yet measured on the offline benchmark.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from core.generation import generate
from core.io import atomic_write_text
from training.losses import token_nll
from training.methods.common import Example, MethodContext, MethodPlan, UnlearnMethod, register
from training.methods.ga import retain_term

log = logging.getLogger(__name__)


class BSTConfig(BaseModel):
    """BS-T (reference ``BST.yaml``: lambda_bst=0.2, top_k=20, GradDiff gamma=1, alpha=1, NLL retain)."""

    lambda_bst: float = Field(0.2, ge=0, le=1, description="Weight of the model's detached top-k belief in the target "
                                                           "(0: plain GA on the one-hot forget token).")
    top_k: int = Field(20, ge=1, description="Size of the belief neighbourhood: the k most likely tokens, renormalised.")
    gamma: float = Field(1.0, gt=0, description="Weight of the forget term.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain term.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")


class BSSConfig(BaseModel):
    """BS-S (reference ``BSS.yaml``: lambda_bss=0.5, 3 samples at temperature 1, GA base loss, GradDiff retain)."""

    lambda_bss: float = Field(0.5, ge=0, le=1, description="Weight of the sampled answers' loss against the original "
                                                           "forget answers'.")
    n_samples: int = Field(3, ge=1, le=64, description="Answers sampled per forget question (the paper's N).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy (one answer per question).")
    max_new_tokens: int = Field(32, ge=4, le=1024, description="Length cap of a sampled answer (reference: 200).")
    forget_loss: Literal["ga", "bs-t"] = Field("ga", description="Base unlearning loss L applied to both answer sets.")
    lambda_bst: float = Field(0.2, ge=0, le=1, description="BS-T mixing weight when forget_loss='bs-t'.")
    top_k: int = Field(20, ge=1, description="BS-T belief size when forget_loss='bs-t'.")
    gamma: float = Field(1.0, gt=0, description="Weight of the forget term.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain term.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")
    samples_path: str | None = Field(None, description="Explicit JSONL cache of the samples (default: under the "
                                                       "cache root).")


# ---- BS-T on tensors -------------------------------------------------------------------------------

def next_token_view(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T-1, V] aligned with the tokens they predict [B, T-1] (-100 where nothing is predicted)."""
    return logits[:, :-1, :].float(), labels[:, 1:]


def bst_target(logits: torch.Tensor, targets: torch.Tensor, lambda_bst: float, top_k: int) -> torch.Tensor:
    """BS-T's soft target ``lambda * sg(softmax(top_k(z))) + (1 - lambda) * onehot(y)``, zero where targets == -100.

    ``logits`` [..., V] and ``targets`` [...] are aligned (``logits[i]`` predicts ``targets[i]``); the
    result carries no gradient.
    """
    z = logits.detach().float()
    if top_k < z.size(-1):
        values, index = torch.topk(z, top_k, dim=-1)
        z = torch.full_like(z, float("-inf")).scatter(-1, index, values)
    belief = torch.softmax(z, -1)
    valid = targets != -100
    onehot = F.one_hot(targets.clamp(min=0), z.size(-1)).to(belief.dtype)
    return (lambda_bst * belief + (1.0 - lambda_bst) * onehot) * valid.unsqueeze(-1)


def bst_loss(logits: torch.Tensor, targets: torch.Tensor, lambda_bst: float, top_k: int) -> torch.Tensor:
    """``mean_seq mean_i <t_i, log_softmax(z_i)>`` over the counted tokens (BS-T's ascent term, minimised).

    Sequences are averaged over their own tokens first, then over the batch, as the reference does;
    sequences without a counted token are left out.
    """
    t = bst_target(logits, targets, lambda_bst, top_k)
    inner = (t * torch.log_softmax(logits.float(), -1)).sum(-1)
    n = (targets != -100).sum(-1)
    per_seq = inner.sum(-1) / n.clamp(min=1)
    has = n > 0
    return per_seq[has].mean() if bool(has.any()) else per_seq.sum() * 0.0


def _forward(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Logits of a padded batch (no HF loss)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def forget_terms(model: Any, batch: dict[str, Any], kind: str, lambda_bst: float,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forget loss to minimise, detached token-mean answer NLL) of one batch, from one forward pass.

    ``kind`` "ga" gives GA's ``-NLL`` (token mean over the batch), "bs-t" gives :func:`bst_loss`.
    """
    full = _forward(model, batch)
    nll, mask = token_nll(full, batch["labels"])
    mean = nll.sum() / mask.sum().clamp(min=1)
    if kind == "bs-t":
        logits, targets = next_token_view(full, batch["labels"])
        return bst_loss(logits, targets, lambda_bst, top_k), mean.detach()
    return -mean, mean.detach()


# ---- BS-S: the model's own answers, sampled once and cached ---------------------------------------

class BeliefSample(BaseModel):
    """One cached model answer to a forget question (BS-S's bootstrapped forget data)."""

    question: str
    group: int = -1
    sample: int = Field(0, ge=0, description="Index among the question's samples.")
    text: str


def samples_cache_path(root: Path, model_digest: str, questions: list[tuple[str, int]], cfg: BSSConfig, seed: int,
                       system: str | None) -> Path:
    """Cache file for the samples of these (question, group) pairs under ``root/beliefs``."""
    key = [model_digest, questions, cfg.n_samples, cfg.temperature, cfg.max_new_tokens, seed, system]
    h = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return root / "beliefs" / f"beliefs-{model_digest}-{h}.jsonl"


def sample_beliefs(model: Any, tokenizer: Any, questions: list[tuple[str, int]], cfg: BSSConfig, seed: int,
                   system: str | None = None) -> list[BeliefSample]:
    """``n_samples`` answers per question from ``model`` (seeded sampling; one greedy answer at temperature 0)."""
    n = cfg.n_samples if cfg.temperature > 0 else 1
    prompts = [q for q, _ in questions for _ in range(n)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        texts = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, system=system,
                         temperature=cfg.temperature, progress=True, desc="bs-s samples")
    return [BeliefSample(question=q, group=g, sample=j, text=texts[i * n + j])
            for i, (q, g) in enumerate(questions) for j in range(n)]


def load_or_sample_beliefs(ctx: MethodContext, cfg: BSSConfig) -> list[BeliefSample]:
    """The cached samples for the forget questions, else sampled from the original model and cached."""
    questions = [(q.question, ti) for q, ti in ctx.forget_items]
    path = Path(cfg.samples_path) if cfg.samples_path else samples_cache_path(
        ctx.cache_root, ctx.model_digest, questions, cfg, ctx.seed, ctx.system)
    if path.exists():
        records = [BeliefSample.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        if sorted({(r.question, r.group) for r in records}) == sorted(set(questions)):
            log.info("reusing %d cached BS-S samples from %s", len(records), path)
            return records
        log.warning("BS-S sample cache %s holds other questions; resampling", path)
    records = sample_beliefs(ctx.model, ctx.tokenizer, questions, cfg, ctx.seed, ctx.system)
    atomic_write_text(path, "".join(r.model_dump_json() + "\n" for r in records))
    return records


# ---- the two methods ---------------------------------------------------------------------------------

def prepare_bst(ctx: MethodContext, cfg: BSTConfig) -> MethodPlan:
    """BS-T needs the forget and retain streams; a KL retain term uses the frozen original."""
    if cfg.retain_loss == "kl":
        ctx.reference()

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f, nll = forget_terms(model, batch["forget"], "bs-t", cfg.lambda_bst, cfg.top_k)
        r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
        return {"loss": cfg.gamma * f + cfg.alpha * r, "forget_loss": cfg.gamma * f, "bs_t": f.detach(), "forget_nll": nll,
                f"retain_{cfg.retain_loss}": r}

    return MethodPlan(loss_fn=loss_fn, streams=ctx.streams, config=cfg)


def prepare_bss(ctx: MethodContext, cfg: BSSConfig) -> MethodPlan:
    """Sample (or reuse) the original model's answers to the forget questions, then pair them with the forget data."""
    if not ctx.forget_items:
        raise ValueError("BS-S needs forget QA items (questions) to sample the model's answers to; the task has none")
    if cfg.retain_loss == "kl":
        ctx.reference()
    records = load_or_sample_beliefs(ctx, cfg)
    beliefs: list[Example] = [ctx.encode_qa(r.question, r.text, r.group) for r in records if r.text.strip()]
    if not beliefs:
        raise ValueError("BS-S: every sampled answer was empty; raise max_new_tokens or the temperature")
    streams = {"forget": ctx.streams["forget"], "forget_belief": beliefs, "retain": ctx.streams["retain"]}

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f, nll = forget_terms(model, batch["forget"], cfg.forget_loss, cfg.lambda_bst, cfg.top_k)
        fb, belief_nll = forget_terms(model, batch["forget_belief"], cfg.forget_loss, cfg.lambda_bst, cfg.top_k)
        forget = (1.0 - cfg.lambda_bss) * f + cfg.lambda_bss * fb
        r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
        return {"loss": cfg.gamma * forget + cfg.alpha * r, "forget_loss": cfg.gamma * forget, "bs_s": forget.detach(), "forget_nll": nll,
                "belief_nll": belief_nll, f"retain_{cfg.retain_loss}": r}

    info = {"samples": len(beliefs), "example": records[0].model_dump()}
    return MethodPlan(loss_fn=loss_fn, streams=streams, config=cfg, info=info)


_TRAIN = {"lr": 1e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}

register(UnlearnMethod(
    name="bs-t", config=BSTConfig, prepare=prepare_bst,
    summary="ascent on a target mixing the forget token with the model's detached top-k belief, plus retain NLL",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll", train_defaults=_TRAIN))
register(UnlearnMethod(
    name="bs-s", config=BSSConfig, prepare=prepare_bss,
    summary="ascent on the forget answers and on the model's own sampled answers to the forget questions",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll", train_defaults=_TRAIN))
