"""Batched teacher-forced scoring: log-probabilities of target tokens after a prefix, one forward per batch.

Every probability metric goes through :func:`score_continuations`. Sequences are sorted by length,
left-padded (with explicit ``position_ids`` so padding does not shift positions) and the model is
asked for logits only over the target span (``logits_to_keep``), so a batch costs
``batch x target_len x vocab`` floats rather than ``batch x seq_len x vocab``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from core.generation import chat_text
from eval.metrics.base import check_pairs, resolve_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenScores:
    """Per target token: its log-probability and whether greedy decoding would have produced it."""

    logprobs: np.ndarray
    greedy: np.ndarray

    @property
    def n(self) -> int:
        """Number of scored target tokens."""
        return int(self.logprobs.shape[0])

    def mean_logprob(self) -> float:
        """Length-normalised log-probability (NaN when nothing was scored)."""
        return float(self.logprobs.mean()) if self.n else float("nan")

    def sum_logprob(self) -> float:
        """Total log-probability of the target (0 for an empty target)."""
        return float(self.logprobs.sum())

    def normalised_prob(self) -> float:
        """``P(target)^(1/|target|)``: TOFU's length-normalised probability (NaN when empty)."""
        m = self.mean_logprob()
        return math.exp(m) if not math.isnan(m) else float("nan")


def token_logprobs_from_logits(logits: Any, targets: Any) -> Any:
    """``log_softmax(logits)[target]`` computed as ``logit - logsumexp`` (no full log-softmax copy)."""
    import torch

    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _pad_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else eos, else 0 (padded positions are masked anyway)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    """Left-pad token rows into ``input_ids``, ``attention_mask`` and matching ``position_ids``."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _forward_tail(model: Any, ids: Any, mask: Any, pos: Any, keep: int) -> Any:
    """Logits of the last ``keep`` positions, asking the model to compute only those when it can."""
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
    except TypeError:  # an architecture without logits_to_keep: compute all and slice
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[:, -keep:]


def _truncate(prefix: Sequence[int], target: Sequence[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Fit prefix + target into ``max_length``: drop prefix tokens from the left, then target tokens from the right."""
    p, t = list(prefix), list(target)
    if max_length is None or len(p) + len(t) <= max_length:
        return p, t
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a prefix token and a target token")
    t = t[: max_length - 1]
    return p[max(0, len(p) + len(t) - max_length):], t


def score_continuations(model: Any, tokenizer: Any, prefixes: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                        *, batch_size: int = 16, max_length: int | None = None,
                        progress: bool = False) -> list[TokenScores]:
    """Score each target token sequence after its prefix (teacher forcing), batched by length."""
    import torch

    model, tokenizer = resolve_model(model, tokenizer)
    check_pairs("prefixes", prefixes, "targets", targets)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = []
    for i, (p, t) in enumerate(zip(prefixes, targets, strict=True)):
        if not p:
            raise ValueError(f"prefix {i} is empty: the first target token needs at least one token before it")
        pairs.append(_truncate(p, t, max_length))
    empty = TokenScores(np.zeros(0, dtype=np.float64), np.zeros(0, dtype=bool))
    out: list[TokenScores] = [empty] * len(pairs)
    todo = sorted((i for i, (_, t) in enumerate(pairs) if t), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    bar = tqdm(total=len(todo), desc="score", disable=not progress, leave=False)
    with torch.no_grad():
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            rows = [pairs[i][0] + pairs[i][1] for i in idx]
            ids, mask, pos = _left_pad(rows, pad, device)
            k = max(len(pairs[i][1]) for i in idx)
            logits = _forward_tail(model, ids, mask, pos, k + 1)[:, :-1]  # position j predicts token j+1
            tgt = torch.zeros((len(idx), k), dtype=torch.long)
            for r, i in enumerate(idx):
                t = pairs[i][1]
                tgt[r, k - len(t):] = torch.tensor(t, dtype=torch.long)
            tgt = tgt.to(device)
            lp = token_logprobs_from_logits(logits, tgt).double().cpu().numpy()
            greedy = (logits.argmax(-1) == tgt).cpu().numpy()
            for r, i in enumerate(idx):
                n = len(pairs[i][1])
                out[i] = TokenScores(lp[r, k - n:].copy(), greedy[r, k - n:].copy())
            bar.update(len(idx))
    bar.close()
    return out


def encode_prompt(tokenizer: Any, question: str, *, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of a question as the model sees it before answering (chat-templated by default)."""
    if chat:
        return list(tokenizer(chat_text(tokenizer, question, system), add_special_tokens=False)["input_ids"])
    return list(tokenizer(question, add_special_tokens=True)["input_ids"])


def score_answers(model: Any, tokenizer: Any, questions: Sequence[str], answers: Sequence[str], *,
                  chat: bool = True, system: str | None = None, batch_size: int = 16,
                  max_length: int | None = 512, progress: bool = False) -> list[TokenScores]:
    """Score each answer's tokens given its (chat-templated) question: answer tokens only."""
    model, tokenizer = resolve_model(model, tokenizer)
    check_pairs("questions", questions, "answers", answers)
    cache: dict[str, list[int]] = {}
    prefixes = []
    for q in questions:
        if q not in cache:
            cache[q] = encode_prompt(tokenizer, q, chat=chat, system=system)
        prefixes.append(cache[q])
    targets = [list(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return score_continuations(model, tokenizer, prefixes, targets, batch_size=batch_size,
                               max_length=max_length, progress=progress)


def score_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8,
                max_length: int | None = 512, progress: bool = False) -> list[TokenScores]:
    """Score every token of each plain text after its first (no chat template), up to ``max_length`` tokens."""
    model, tokenizer = resolve_model(model, tokenizer)
    encoded = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    prefixes, targets, keep = [], [], []
    for i, ids in enumerate(encoded):
        if len(ids) >= 2:
            ids = ids[:max_length] if max_length else ids
            prefixes.append(ids[:1])
            targets.append(ids[1:])
            keep.append(i)
        else:
            log.warning("text %d has fewer than two tokens and cannot be scored", i)
    scored = score_continuations(model, tokenizer, prefixes, targets, batch_size=batch_size, progress=progress)
    out = [TokenScores(np.zeros(0, dtype=np.float64), np.zeros(0, dtype=bool))] * len(texts)
    for i, s in zip(keep, scored, strict=True):
        out[i] = s
    return out


def next_token_logprobs(model: Any, tokenizer: Any, prefixes: Sequence[Sequence[int]], candidates: Sequence[int], *,
                        batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """Log-probabilities of a few candidate next tokens after each prefix: an array (n_prefixes, n_candidates)."""
    import torch

    model, tokenizer = resolve_model(model, tokenizer)
    if any(not p for p in prefixes):
        raise ValueError("every prefix needs at least one token")
    out = np.zeros((len(prefixes), len(candidates)), dtype=np.float64)
    order = sorted(range(len(prefixes)), key=lambda i: -len(prefixes[i]))
    device = next(model.parameters()).device
    cand = torch.tensor(list(candidates), dtype=torch.long, device=device)
    pad = _pad_id(tokenizer)
    bar = tqdm(total=len(order), desc="score", disable=not progress, leave=False)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask, pos = _left_pad([prefixes[i] for i in idx], pad, device)
            last = _forward_tail(model, ids, mask, pos, 1)[:, -1].float()
            lp = (last.index_select(-1, cand) - torch.logsumexp(last, dim=-1, keepdim=True)).double().cpu().numpy()
            out[idx] = lp
            bar.update(len(idx))
    bar.close()
    return out
