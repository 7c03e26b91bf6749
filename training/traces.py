"""Reasoning traces for R²MU: the model's own chain of thought on forget questions, and worked reasoning solutions.

*Forget traces* are generated: each forget question is asked with the reference code's reasoning
trigger appended ("Let's reason this step by step.", zero-shot chain-of-thought prompting). A small
chat model fine-tuned on one-line answers ends its reply after one sentence (on the default task all
forget "traces" read "Philippa Stavberg was born in Saint Alder."), so by default the trace is
*scaffolded*: the step headers of :data:`SCAFFOLD_STEPS` are forced one at a time and the model
writes each step's line greedily, with its earlier steps in context ("Step 1: The question asks about
Philippa Stavberg's birthplace. / Step 2: What I know that is relevant: Philippa Stavberg was born in
Saint Alder. / ..."). Every word after a header is the model's own; ``style="free"`` keeps the single
free continuation. Each trace is cut to ``max_tokens`` tokens. *General
traces* are given: a :class:`TraceSpec` that carries a worked solution (R²MU's preservation data,
from :mod:`training.reasoning_data`) takes that solution, cut the same way, and is never generated.

All records of one R²MU set-up are cached together as JSONL (one record a line, written
atomically) under a name that hashes the model weights, the prompt version, the trigger, the length
and the specs, and are reused when present.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, Field

from core.generation import generate
from core.io import atomic_write_text

log = logging.getLogger(__name__)

REASONING_TRIGGER = "Let's reason this step by step."
TRACE_PROMPT_VERSION = "cot-v2"
"""Version of the trace prompt, scaffold and cut; part of the cache key."""

SCAFFOLD_STEPS = ("Step 1: The question asks", "Step 2: What I know that is relevant:", "Step 3: Putting it together,",
                  "Answer:")
"""Step headers of a scaffolded trace: the model writes each step's line after its header (see
:func:`scaffold_traces`)."""
TraceStyle = Literal["scaffold", "free"]


class TraceSpec(NamedTuple):
    """What to trace: a question, its stream ('forget' or 'retain'), its target index, and a worked solution if given."""

    question: str
    kind: str
    group: int = -1
    solution: str | None = None


class TraceRecord(BaseModel):
    """One cached trace: the question, the user turn it was asked with, the trace, its stream and where it came from."""

    question: str
    prompt: str
    trace: str
    kind: str = Field(description="'forget' or 'retain'.")
    group: int = -1
    source: str = Field("generated", description="'generated' (the model's chain of thought) or 'worked' (given).")


def trace_prompt(question: str, trigger: str = REASONING_TRIGGER) -> str:
    """The user turn that elicits reasoning: the question followed by the trigger."""
    return f"{question.rstrip()} {trigger}".strip()


def scaffold_traces(model: Any, tokenizer: Any, prompts: Sequence[str], steps: Sequence[str] = SCAFFOLD_STEPS,
                    step_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Step-by-step traces for models that answer in one line: each step header is forced and the model writes
    that step's line (greedy, up to ``step_tokens`` tokens, stopped at a line break), with the earlier steps in
    context."""
    done = [""] * len(prompts)
    for n, header in enumerate(steps):
        heads = [f"{d}\n{header}" if d else header for d in done]
        lines = generate(model, tokenizer, list(prompts), max_new_tokens=step_tokens, batch_size=batch_size,
                         prefixes=heads, stop_at_newline=True, progress=True, desc=f"traces (step {n + 1})")
        done = [f"{h} {line}".rstrip() for h, line in zip(heads, lines, strict=True)]
    return done


def cut_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (decoded back to text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def trace_cache_path(root: Path, model_digest: str, questions: Sequence[tuple[Any, ...]], trigger: str,
                     max_tokens: int, style: TraceStyle = "scaffold") -> Path:
    """Cache file for these trace specs under ``root/traces``."""
    key = [model_digest, TRACE_PROMPT_VERSION, trigger, max_tokens, style, [list(TraceSpec(*q)) for q in questions]]
    h = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return root / "traces" / f"traces-{model_digest}-{h}.jsonl"


def read_traces(path: Path) -> list[TraceRecord]:
    """Read a trace cache written by :func:`write_traces`."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(TraceRecord.model_validate_json(line))
            except ValueError as e:
                raise ValueError(f"{path}: line {n}: not a trace record ({e}); delete the file to regenerate") from e
    return out


def write_traces(path: Path, records: Sequence[TraceRecord]) -> Path:
    """Write traces as JSONL atomically (a crash leaves no partial cache)."""
    return atomic_write_text(path, "".join(r.model_dump_json() + "\n" for r in records))


def load_or_generate_traces(model: Any, tokenizer: Any, questions: Sequence[tuple[Any, ...]], root: Path,
                            model_digest: str, trigger: str = REASONING_TRIGGER, max_tokens: int = 48,
                            batch_size: int = 16, path: Path | None = None,
                            style: TraceStyle = "scaffold") -> list[TraceRecord]:
    """Traces for ``questions`` (:class:`TraceSpec` fields): read from the cache, else generated or taken, then cached.

    Specs without a solution are generated by ``model`` from :func:`trace_prompt`, step by step
    (:func:`scaffold_traces`) or, for ``style="free"``, as one free continuation; specs with one take it.
    """
    specs = [TraceSpec(*q) for q in questions]
    path = path or trace_cache_path(root, model_digest, specs, trigger, max_tokens, style)
    if path.exists():
        records = read_traces(path)
        if [(r.question, r.kind, r.group) for r in records] == [(s.question, s.kind, s.group) for s in specs]:
            log.info("reusing %d cached reasoning traces from %s", len(records), path)
            return records
        log.warning("trace cache %s holds other questions; regenerating", path)
    todo = [i for i, s in enumerate(specs) if s.solution is None]
    texts = {i: s.solution or "" for i, s in enumerate(specs) if s.solution is not None}
    if todo:
        log.info("generating %d reasoning traces (%d tokens each)", len(todo), max_tokens)
        prompts = [trace_prompt(specs[i].question, trigger) for i in todo]
        if style == "scaffold":
            out = scaffold_traces(model, tokenizer, prompts, batch_size=batch_size)
        else:
            out = generate(model, tokenizer, prompts, max_new_tokens=max_tokens, batch_size=batch_size, progress=True,
                           desc="traces")
        texts.update(zip(todo, out, strict=True))
    records = [TraceRecord(question=s.question, prompt=trace_prompt(s.question, trigger),
                           trace=cut_tokens(tokenizer, texts[i], max_tokens) or "...", kind=s.kind, group=s.group,
                           source="worked" if s.solution is not None else "generated")
               for i, s in enumerate(specs)]
    write_traces(path, records)
    return records
