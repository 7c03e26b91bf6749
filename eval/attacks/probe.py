"""A linear probe on hidden states: does the model still *represent* the right answer after unlearning?

For each question with options (a QA item with its reference and perturbed answers, or an MCQ
item), every (question, option) pair is run through the model and the hidden state at one layer is
mean-pooled over the option's tokens. A logistic-regression probe learns "correct vs perturbed" on
one split (retain items by default) and is tested on the other (forget items), or vice versa. The
score is the probe's *option accuracy*: the fraction of test questions whose correct option gets the
highest probe score (chance = mean of 1 / number of options). A probe that still picks the right
answers on forget items means the knowledge is still linearly readable from the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field

from core.schema import ForgetTask, MCQItem, QAItem
from eval.attacks.base import AttackConfig, AttackError, ProbeAttack, register_attack

if TYPE_CHECKING:
    from core.models import LoadedLLM


class OptionItem(BaseModel):
    """A question with candidate answers, one of them correct."""

    question: str
    options: list[str] = Field(min_length=2)
    correct: int


def options_of(items: Sequence[QAItem | MCQItem]) -> list[OptionItem]:
    """QA items with perturbed answers and MCQ items as option sets (QA items without perturbations are skipped)."""
    out = []
    for it in items:
        if isinstance(it, MCQItem):
            out.append(OptionItem(question=it.question, options=list(it.choices), correct=it.answer))
        elif it.perturbed_answers:
            out.append(OptionItem(question=it.question, options=[it.answer, *it.perturbed_answers], correct=0))
    return out


@dataclass
class ProbeData:
    """Features of every (question, option) pair: ``X`` (n, d), labels ``y`` (1 = correct), question ids ``groups``."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray

    def __post_init__(self) -> None:
        if not (len(self.X) == len(self.y) == len(self.groups)):
            raise ValueError(f"X, y and groups must have the same length; got {len(self.X)}, {len(self.y)}, {len(self.groups)}")


class ProbeResult(BaseModel):
    """Probe accuracy on the test split, with chance level and sizes so it can be judged."""

    accuracy: float = Field(description="Option accuracy: test questions whose correct option scores highest.")
    chance: float = Field(description="Expected option accuracy of a random guess.")
    pair_accuracy: float = Field(description="Balanced accuracy of the correct/perturbed decision per option.")
    train_accuracy: float
    n_train: int
    n_test: int
    layer: int
    train_on: str


def option_accuracy(scores: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(accuracy, chance): per group, is the option with the highest score the correct one (ties split)?"""
    hits, chance, n = 0.0, 0.0, 0
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if y[idx].sum() != 1:
            raise ValueError(f"question {g} has {int(y[idx].sum())} correct options; exactly one is needed")
        top = idx[scores[idx] == scores[idx].max()]  # ties share the credit, so a constant probe scores chance
        hits += float(y[top].sum()) / len(top)
        chance += 1.0 / len(idx)
        n += 1
    if n == 0:
        raise ValueError("no test questions to score the probe on")
    return hits / n, chance / n


def fit_probe(train: ProbeData, test: ProbeData, C: float = 1.0, seed: int = 0, layer: int = -1,
              train_on: str = "retain") -> ProbeResult:
    """Train a standardised logistic-regression probe on ``train`` and report its accuracy on ``test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train.y)) < 2:
        raise AttackError("the probe's training data has a single class; it needs correct and perturbed options")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, class_weight="balanced",
                                                             random_state=seed))
    clf.fit(train.X, train.y)
    test_scores = clf.decision_function(test.X)
    acc, chance = option_accuracy(test_scores, test.y, test.groups)
    train_acc, _ = option_accuracy(clf.decision_function(train.X), train.y, train.groups)
    pair = float(balanced_accuracy_score(test.y, (test_scores > 0).astype(int))) if len(np.unique(test.y)) > 1 else float("nan")
    return ProbeResult(accuracy=acc, chance=chance, pair_accuracy=pair, train_accuracy=train_acc,
                       n_train=len(np.unique(train.groups)), n_test=len(np.unique(test.groups)), layer=layer,
                       train_on=train_on)


def hidden_features(llm: LoadedLLM, items: Sequence[OptionItem], layer: int, batch_size: int = 16,
                    max_length: int = 256) -> ProbeData:
    """Hidden state at ``layer`` (0 = embeddings, negative counts from the end), mean-pooled over each option's tokens.

    The forward stops at the probed layer (layers above it cannot change its output), so a mid-depth probe
    costs about half a full forward.
    """
    import torch

    from core.generation import encode_qa, pad_batch
    from training.activations import layer_output

    model, tok = llm.model, llm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples, y, groups = [], [], []
    for gi, it in enumerate(items):
        for oi, opt in enumerate(it.options):
            examples.append(encode_qa(tok, it.question, opt, max_length=max_length))
            y.append(int(oi == it.correct))
            groups.append(gi)
    if not examples:
        raise AttackError("no option items to extract hidden states from")
    device = next(model.parameters()).device
    n_states = model.config.num_hidden_layers + 1  # hidden_states: embeddings, then one per decoder layer
    if not -n_states <= layer < n_states:
        raise AttackError(f"layer {layer} is out of range; the model has hidden states 0..{n_states - 1}")
    k = layer % n_states
    feats = []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            batch = pad_batch(examples[s:s + batch_size], pad_id)
            ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            if 1 <= k < n_states - 1:  # the output of decoder layer k-1: stop the forward there
                h = layer_output(model, k - 1, ids, attn).float().cpu()
            else:  # embeddings, or the last state (after the final norm): a full forward
                h = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[k].float().cpu()
            mask = (batch["labels"] != -100).float().unsqueeze(-1)  # the option's tokens (answer + EOS)
            feats.append(((h * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
    return ProbeData(X=np.concatenate(feats), y=np.asarray(y), groups=np.asarray(groups))


class ProbeConfig(AttackConfig):
    """Layer, direction and size of the probe."""

    layer: int | None = Field(None, description="Hidden-state index (0 = embeddings); None: the middle layer.")
    train_on: Literal["retain", "forget"] = Field("retain", description="Train on this split, test on the other.")
    max_items: int | None = Field(200, ge=2, description="Questions sampled (seeded) per split (None: all).")
    C: float = Field(1.0, gt=0, description="Inverse L2 regularisation of the logistic regression.")
    use_mcq: bool = Field(True, description="Also use MCQ items (retain_mcq / forget_mcq).")
    batch_size: int = Field(16, ge=1)


@register_attack
class LinearProbeAttack(ProbeAttack):
    """Train a linear probe on hidden states to pick the correct answer among perturbed ones."""

    name: ClassVar[str] = "linear-probe"
    description: ClassVar[str] = ("Linear probe: logistic regression on mean-pooled hidden states at one layer, "
                                  "trained to tell the correct answer from perturbed ones on retain items and tested on "
                                  "forget items (or vice versa); reports option accuracy vs chance.")
    config_cls = ProbeConfig
    config: ProbeConfig

    def _split(self, task: ForgetTask, which: str) -> list[OptionItem]:
        """Option items of the forget or retain split, sampled with the seed."""
        if which == "forget":
            qa: list[QAItem | MCQItem] = [q for q in task.forget_qa if q.kind == "fact"]
            qa += task.forget_mcq if self.config.use_mcq else []
        else:
            qa = list(task.retain_qa) + (list(task.retain_mcq) if self.config.use_mcq else [])
        items = options_of(qa)
        if len(items) < 2:
            raise AttackError(f"task {task.name!r} has {len(items)} {which} items with options (perturbed answers or "
                              f"MCQ); the probe needs at least 2")
        n = self.config.max_items
        if n is not None and n < len(items):
            idx = sorted(self.rng(which).sample(range(len(items)), n))
            items = [items[i] for i in idx]
        return items

    def resolve_layer(self, llm: LoadedLLM) -> int:
        """The hidden-state index to probe (the middle decoder layer unless configured)."""
        if self.config.layer is not None:
            return self.config.layer
        return max(1, int(llm.model.config.num_hidden_layers) // 2)

    def score(self, llm: LoadedLLM, task: ForgetTask) -> ProbeResult:
        """Extract features on both splits, fit on one, report accuracy on the other."""
        layer = self.resolve_layer(llm)
        test_on = "forget" if self.config.train_on == "retain" else "retain"
        train = hidden_features(llm, self._split(task, self.config.train_on), layer, self.config.batch_size)
        test = hidden_features(llm, self._split(task, test_on), layer, self.config.batch_size)
        return fit_probe(train, test, C=self.config.C, seed=self.seed, layer=layer, train_on=self.config.train_on)


def synthetic_probe_data(n_questions: int, n_options: int, dim: int, separation: float, seed: int = 0) -> ProbeData:
    """Gaussian features where correct options are shifted by ``separation`` along one direction (for tests/sanity)."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim)
    direction[0] = 1.0
    X, y, g = [], [], []
    for q in range(n_questions):
        correct = int(rng.integers(n_options))
        for o in range(n_options):
            X.append(rng.normal(size=dim) + (separation * direction if o == correct else 0.0))
            y.append(int(o == correct))
            g.append(q)
    return ProbeData(X=np.asarray(X), y=np.asarray(y), groups=np.asarray(g))

