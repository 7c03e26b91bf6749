"""Systems under test, one interface: the original model, the guard, unlearned weights, guard + weights.

Every system answers prompts (strings or chat messages). Systems whose weights are the ones
answering also expose them (``llm``), so teacher-forced metrics and weight-side attacks apply;
a guard's weights are the wrapped model's, but an attacker holding them simply drops the guard,
so the evaluation reports white-box metrics for guard systems as not applicable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from core.generation import Prompt, generate
from core.models import LoadedLLM

log = logging.getLogger(__name__)

SystemKind = Literal["original", "guard", "weights", "guard+weights", "reference"]
# The kinds an attack can target (the reference model is only a yardstick).
ATTACKABLE: tuple[SystemKind, ...] = ("original", "guard", "weights", "guard+weights")


@dataclass(frozen=True)
class Response:
    """One answer of a system: the text, and for a guarded system the guard's trace and finish reason."""

    text: str
    trace: Any | None = None
    finish_reason: str = "stop"
    reasoning: str | None = None  # a reasoning model's thinking, where its server returns it apart from the answer

    @property
    def shown(self) -> str:
        """Everything the user receives: the reasoning (when returned apart) and the answer, so a fact that appears
        while the model thinks counts as a leak."""
        return f"{self.reasoning}\n{self.text}" if self.reasoning else self.text

    @property
    def source(self) -> str:
        """Where a guarded answer came from: 'unflagged', 'cot' (the guard model's instruction), 'template' or
        'refused' (a refusal, or an answer the output check blocked); 'model' for an unguarded system."""
        if self.trace is None:
            return "model"
        if self.finish_reason == "content_filter" or self.trace.requires_refusal:
            return "refused"
        if not self.trace.flagged:
            return "unflagged"
        return "cot" if self.trace.instruction_source == "llm" else "template"


@dataclass
class System:
    """Something that answers prompts, with a name for the report and a kind for attack applicability."""

    name: str
    kind: SystemKind
    llm: LoadedLLM
    guarded: Any | None = None  # guard.api.GuardedLLM when the system is guarded
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def white_box(self) -> bool:
        """True where the answering weights are the whole system (teacher-forced metrics apply)."""
        return self.guarded is None

    def respond(self, prompts: Sequence[Prompt], max_new_tokens: int = 48, batch_size: int = 32,
                desc: str | None = None) -> list[Response]:
        """Greedy answers to ``prompts`` (through the guard where there is one), each with the guard's trace."""
        if not prompts:
            return []
        if self.guarded is not None:
            from tqdm.auto import tqdm

            out: list[Response] = []
            bar = tqdm(total=len(prompts), desc=desc or f"{self.name} answers", leave=False)
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                out += [Response(r.text, r.trace, r.finish_reason, r.reasoning)
                        for r in self.guarded.generate_batch(chunk, max_new_tokens=max_new_tokens)]
                bar.update(len(chunk))
            bar.close()
            return out
        texts = generate(self.llm.model, self.llm.tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, progress=True, desc=desc or f"{self.name} answers")
        return [Response(t) for t in texts]

    def answer(self, prompts: Sequence[Prompt], max_new_tokens: int = 48, batch_size: int = 32,
               desc: str | None = None) -> list[str]:
        """Greedy answers to ``prompts`` as the user receives them, reasoning included (see :meth:`respond`)."""
        return [r.shown for r in self.respond(prompts, max_new_tokens, batch_size, desc)]


def model_system(name: str, llm: LoadedLLM, kind: SystemKind = "weights") -> System:
    """A bare model as a system under test."""
    return System(name=name, kind=kind, llm=llm)


def guarded_system(name: str, llm: LoadedLLM, detector: Any, task: Any, guard_config: Any | None = None,
                   kind: SystemKind = "guard", guard_llm: LoadedLLM | None = None) -> System:
    """The guard around ``llm`` (the CoT guard model is ``guard_llm``, default the same model)."""
    from guard.api import GuardedLLM
    from guard.backends.transformers import TransformersBackend

    target = TransformersBackend(llm)
    guard_backend = None if guard_llm is None else TransformersBackend(guard_llm)
    guarded = GuardedLLM(target=target, detector=detector, guard=guard_backend, config=guard_config, targets=task)
    return System(name=name, kind=kind, llm=llm, guarded=guarded)
