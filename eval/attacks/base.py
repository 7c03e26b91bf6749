"""What every attack shares: the ``ATTACKS`` registry, the attack interfaces, attacked prompts, recovery.

Three kinds of attack, each a class registered in :data:`ATTACKS` under its ``name``:

* :class:`PromptAttack` turns a forget QA item (plus the task, for aliases, multi-hop items and
  retain facts) into attacked prompts, each keeping the item's reference answer for scoring. It
  needs no access to the model, so it runs against every system: the guard, the unlearned weights,
  both, and the original model (the original's score *under the same attack* is the fairest
  reference, since e.g. a translated or base64 question may stump even the model that knows).
* :class:`WeightAttack` takes a :class:`~core.models.LoadedLLM` and returns a *new* attacked one
  (the input is never modified). It needs the weights, so it applies to the "weights" system only;
  an attacker with the weights of a guarded model simply drops the guard.
* :class:`ProbeAttack` reads hidden states and returns a score (probe accuracy), for "weights" and
  for the "original" reference.

The outcome of an attack is the forget metric under attack and :func:`recovery_ratio`.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.generation import Message
from core.registry import Registry
from core.schema import ForgetTarget, ForgetTask, QAItem
from eval.systems import ATTACKABLE, SystemKind

if TYPE_CHECKING:
    from core.models import LoadedLLM

SYSTEM_KINDS: tuple[str, ...] = ATTACKABLE  # the kinds an attack may name in ``applies_to``
AttackKind = Literal["prompt", "weights", "probe"]
CHAT_ROLES = ("system", "user", "assistant")

PromptValue = str | list[Message]  # an attacked prompt as stored (a concrete list, for validation)


class AttackError(ValueError):
    """An attack was misconfigured or used where it does not apply; the message says how to fix it."""


class AttackConfig(BaseModel):
    """Settings common to all attacks; each attack extends this with its own fields."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="Seeds every random choice of the attack (templates, samples, positions).")


class Attack(ABC):
    """An attack: a name, a one-line description, a seed (in its config), and where it applies."""

    name: ClassVar[str]
    description: ClassVar[str]
    kind: ClassVar[AttackKind]
    applies_to: ClassVar[tuple[SystemKind, ...]]
    config_cls: ClassVar[type[AttackConfig]] = AttackConfig
    config: AttackConfig

    def __init__(self, config: AttackConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        """Build the attack from a config (model or dict) and/or keyword overrides, validated."""
        base = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
        try:
            self.config = self.config_cls.model_validate({**base, **overrides})
        except ValidationError as e:
            fields = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '<config>'}: {err['msg']}" for err in e.errors())
            raise AttackError(f"attack {self.name!r}: invalid config: {fields}; "
                              f"accepted fields: {sorted(self.config_cls.model_fields)}") from e

    @property
    def seed(self) -> int:
        """The seed of every random choice this attack makes."""
        return self.config.seed

    def rng(self, *keys: object) -> random.Random:
        """A random generator fixed by the seed, the attack name and ``keys`` (e.g. the question)."""
        return random.Random("|".join([self.name, str(self.seed), *map(str, keys)]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


ATTACKS: Registry[type[Attack]] = Registry("attack")


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: register an attack under its ``name`` after checking it declares what it must."""
    for attr in ("name", "description", "kind", "applies_to"):
        if not getattr(cls, attr, None):
            raise TypeError(f"attack class {cls.__name__} must set a non-empty class attribute {attr!r}")
    bad = [s for s in cls.applies_to if s not in SYSTEM_KINDS]
    if bad:
        raise TypeError(f"attack {cls.name!r}: unknown system kinds {bad}; known: {list(SYSTEM_KINDS)}")
    return ATTACKS.register(cls.name)(cls)


def make_attack(name: str, config: AttackConfig | dict[str, Any] | None = None, **overrides: Any) -> Attack:
    """Instantiate a registered attack by name (unknown names raise an error listing the known ones)."""
    return ATTACKS.get(name)(config, **overrides)


def attack_names(kind: AttackKind | None = None) -> list[str]:
    """All registered attack names, optionally only those of one kind, sorted."""
    return [n for n in ATTACKS.names() if kind is None or ATTACKS.get(n).kind == kind]


def attacks_for(system: SystemKind | str) -> list[str]:
    """The attacks that apply to a system kind ("original", "guard", "weights", "guard+weights")."""
    if system not in SYSTEM_KINDS:
        raise AttackError(f"unknown system kind {system!r}; known: {', '.join(SYSTEM_KINDS)}")
    return [n for n in ATTACKS.names() if system in ATTACKS.get(n).applies_to]


# ---------------------------------------------------------------------------------------------
# Prompt-side attacks


class AttackedPrompt(BaseModel):
    """One attacked prompt (a string or chat messages) with the reference answer it must not reveal."""

    model_config = ConfigDict(extra="forbid")

    attack: str
    variant: str = Field(description="Which form of the attack made it (template id, language, method...).")
    prompt: PromptValue
    reference: str = Field(description="The item's reference answer, for scoring the response.")
    question: str = Field(description="The original, un-attacked question.")
    item: QAItem
    target_id: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _valid_messages(cls, prompt: PromptValue) -> PromptValue:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("an attacked prompt must not be blank")
            return prompt
        if not prompt:
            raise ValueError("an attacked chat prompt needs at least one message")
        for i, m in enumerate(prompt):
            if set(m) != {"role", "content"} or m["role"] not in CHAT_ROLES:
                raise ValueError(f"message {i} must have exactly 'role' (one of {CHAT_ROLES}) and 'content'; got {m}")
        if prompt[-1]["role"] != "user":
            raise ValueError(f"the last message must be the user's (the model answers it); got {prompt[-1]['role']!r}")
        return prompt

    @property
    def is_chat(self) -> bool:
        """True when the prompt is a list of chat messages rather than one user string."""
        return not isinstance(self.prompt, str)

    def messages(self) -> list[Message]:
        """The prompt as chat messages (a string becomes one user message)."""
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else [dict(m) for m in self.prompt]

    def user_turns(self) -> list[str]:
        """The contents of the user messages, in order."""
        return [m["content"] for m in self.messages() if m["role"] == "user"]

    def text(self) -> str:
        """Every message's content joined by newlines (for logs and for text-only detectors)."""
        return "\n".join(m["content"] for m in self.messages())


class EntityMatch(BaseModel):
    """Where a target's name (canonical or alias) occurs in a question."""

    name: str = Field(description="The name as listed in the target (or the item's subject).")
    text: str = Field(description="The name as written in the question.")
    start: int
    end: int
    target_id: str | None = None
    is_canonical: bool = False


def find_entity(question: str, task: ForgetTask | None = None, subject: str | None = None) -> EntityMatch | None:
    """Find the forget entity a question is about (longest target name, else the item's subject), to rewrite it."""
    import re

    candidates: list[tuple[str, str | None, bool]] = []
    for t in task.targets if task is not None else []:
        candidates += [(n, t.id, i == 0) for i, n in enumerate(t.names)]
    if subject:
        candidates.append((subject, None, False))
    for name, tid, canonical in sorted(candidates, key=lambda c: -len(c[0])):
        m = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", question, flags=re.IGNORECASE)
        if m:
            return EntityMatch(name=name, text=m.group(0), start=m.start(), end=m.end(), target_id=tid, is_canonical=canonical)
    return None


def target_of(item: QAItem, task: ForgetTask | None) -> ForgetTarget | None:
    """The forget target an item belongs to: the one listing it, else the one whose name it mentions."""
    if task is None:
        return None
    for t in task.targets:
        if any(q is item or q == item for q in t.qa):
            return t
    m = find_entity(item.question, task, None)
    if m is not None and m.target_id is not None:
        return task.target(m.target_id)
    for t in task.targets:
        if item.subject is not None and item.subject in t.names:
            return t
    return None


class PromptAttack(Attack):
    """A transform of a forget QA item into attacked prompts; model-free, so it applies to every system."""

    kind: ClassVar[AttackKind] = "prompt"
    applies_to: ClassVar[tuple[SystemKind, ...]] = ATTACKABLE

    @abstractmethod
    def variants(self, item: QAItem, task: ForgetTask | None) -> list[tuple[str, PromptValue]]:
        """(variant id, prompt) pairs for one item; an empty list means the attack has no form for it."""

    def attack(self, item: QAItem, task: ForgetTask | None = None) -> list[AttackedPrompt]:
        """Attack one item, returning prompts that keep the reference answer for scoring."""
        target = target_of(item, task)
        out = []
        for variant, prompt in self.variants(item, task):
            out.append(AttackedPrompt(attack=self.name, variant=variant, prompt=prompt, reference=item.answer,
                                      question=item.question, item=item,
                                      target_id=target.id if target is not None else None,
                                      meta={"seed": self.seed}))
        return out


def run_prompt_attack(attack: PromptAttack | str, items: Sequence[QAItem], task: ForgetTask | None) -> list[AttackedPrompt]:
    """Apply a prompt-side attack to every item, in item order, dropping exact duplicates (same prompt and answer)."""
    if isinstance(attack, str):
        attack = make_attack(attack)  # type: ignore[assignment]
    if not isinstance(attack, PromptAttack):
        raise AttackError(f"{attack.name!r} is a {attack.kind} attack, not a prompt attack; prompt attacks: "
                          f"{attack_names('prompt')}")
    import json

    seen: set[str] = set()
    out: list[AttackedPrompt] = []
    for item in items:
        for ap in attack.attack(item, task):
            key = json.dumps([ap.prompt, ap.reference], ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                out.append(ap)
    return out


# ---------------------------------------------------------------------------------------------
# Weight-side attacks


class WeightAttack(Attack):
    """A change to the weights that returns a new attacked model; the input model is never modified."""

    kind: ClassVar[AttackKind] = "weights"
    applies_to: ClassVar[tuple[SystemKind, ...]] = ("weights",)

    @abstractmethod
    def apply(self, llm: LoadedLLM, task: ForgetTask | None = None) -> LoadedLLM:
        """Return an attacked deep copy of ``llm`` (some attacks need the task's data, others not)."""


class ProbeAttack(Attack):
    """Reads what the hidden states still encode, returning a score rather than a model."""

    kind: ClassVar[AttackKind] = "probe"
    applies_to: ClassVar[tuple[SystemKind, ...]] = ("weights", "original")

    @abstractmethod
    def score(self, llm: LoadedLLM, task: ForgetTask) -> Any:
        """Fit and evaluate the probe on ``llm``; returns a result with an ``accuracy`` field."""


# ---------------------------------------------------------------------------------------------
# Outcome


def recovery_ratio(original: float, unlearned: float, attacked: float, eps: float = 1e-12) -> float:
    """How much of the forgotten metric an attack brings back: ``(attacked - unlearned) / (original - unlearned)``.

    0 means the attack recovered nothing, 1 means it recovered the original model's level. The value
    is not clipped: below 0 the attack made the model forget more, above 1 it recovered more than the
    original had. Rule for an undefined ratio: when ``|original - unlearned| <= eps`` (unlearning
    changed nothing, so there is nothing to recover) or any input is NaN, the result is NaN (a float,
    so that NaN-aware means such as ``finite_mean`` skip it).
    """
    vals = (float(original), float(unlearned), float(attacked))
    if any(math.isnan(v) for v in vals):
        return float("nan")
    denom = vals[0] - vals[1]
    if abs(denom) <= eps:
        return float("nan")
    return (vals[2] - vals[1]) / denom


def attack_recovery(upper: float | None, plain: float | None, attacked: float) -> float | None:
    """The share of forgotten facts an attack brings back on its items, ``(attacked - plain) / (upper - plain)``;
    None where the system forgot nothing there to recover (its plain fact rate on those items is not below the
    reference's): the ratio's sign would flip and read as recovery, or as more forgetting, that did not happen."""
    if upper is None or plain is None or not upper > plain:
        return None
    r = recovery_ratio(upper, plain, attacked)
    return None if math.isnan(r) else r
