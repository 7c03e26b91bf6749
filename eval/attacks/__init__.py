"""The attack suite: prompt-side attacks for every system, weight-side attacks and a probe for weights.

Usage::

    from eval.attacks import make_attack, run_prompt_attack, attacks_for, recovery_ratio

    prompts = run_prompt_attack("alias", task.forget_qa, task)        # list[AttackedPrompt]
    attacked = make_attack("quantize-4bit").apply(unlearned_llm)       # a new LoadedLLM
    probe = make_attack("linear-probe").score(unlearned_llm, task)     # ProbeResult
    attacks_for("guard")                                               # names that apply to a system kind

Importing this package registers every attack in :data:`ATTACKS`: each module of the package is imported, so a
new attack is one new file (see CONTRIBUTING.md).
"""

from core.registry import import_submodules
from eval.attacks.base import (
    ATTACKS,
    SYSTEM_KINDS,
    Attack,
    AttackConfig,
    AttackedPrompt,
    AttackError,
    EntityMatch,
    ProbeAttack,
    PromptAttack,
    SystemKind,
    WeightAttack,
    attack_names,
    attack_recovery,
    attacks_for,
    find_entity,
    make_attack,
    recovery_ratio,
    register_attack,
    run_prompt_attack,
)
from eval.attacks.injection import INJECTION_STRINGS, INJECTION_STYLES, PromptInjectionAttack
from eval.attacks.jailbreak import JAILBREAK_TEMPLATES, JailbreakAttack
from eval.attacks.probe import LinearProbeAttack, ProbeData, ProbeResult, fit_probe, hidden_features
from eval.attacks.prompt import (
    AliasAttack,
    FewShotAttack,
    KeywordEmphasisAttack,
    MultiHopAttack,
    ObfuscationAttack,
    ParaphraseAttack,
    SplitTurnAttack,
    TranslationAttack,
)
from eval.attacks.weights import (
    OODFinetuneAttack,
    Quantize4bitAttack,
    Quantize8bitAttack,
    RelearnAttack,
    quantize_dequantize,
    quantize_model,
)

import_submodules(__name__, __path__)

__all__ = [
    "ATTACKS", "INJECTION_STRINGS", "INJECTION_STYLES", "JAILBREAK_TEMPLATES", "SYSTEM_KINDS", "AliasAttack", "Attack", "AttackConfig",
    "AttackError", "AttackedPrompt", "EntityMatch", "FewShotAttack", "JailbreakAttack",
    "KeywordEmphasisAttack", "LinearProbeAttack", "MultiHopAttack", "OODFinetuneAttack", "ObfuscationAttack",
    "ParaphraseAttack", "ProbeAttack", "ProbeData", "ProbeResult", "PromptAttack", "PromptInjectionAttack",
    "Quantize4bitAttack", "Quantize8bitAttack", "RelearnAttack", "SplitTurnAttack", "SystemKind", "TranslationAttack",
    "WeightAttack", "attack_names", "attack_recovery", "attacks_for", "find_entity", "fit_probe", "hidden_features",
    "make_attack", "quantize_dequantize", "quantize_model", "recovery_ratio", "register_attack", "run_prompt_attack",
]
