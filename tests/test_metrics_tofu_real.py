"""The real TOFU files (../shared/data/tofu) feed the same metrics as the offline benchmark.

Loads forget01 through the task-spec resolver, then computes TOFU's split metrics, forget quality
(KS test of truth ratios against a second "retain" model) and model utility on a tiny random
model. Skipped when the shared data is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from core.models import tiny_llm
from eval.metrics import forget_quality, tofu_model_utility, tofu_split_metrics, truth_ratio
from eval.metrics.rouge import rouge_l_recall
from eval.tasks.spec import load_task_spec

TOFU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"
N = 8  # items per split: enough to exercise every code path, small enough for a tiny model on CPU


@pytest.fixture(scope="module")
def task():  # type: ignore[no-untyped-def]
    if not TOFU.is_dir():
        pytest.skip(f"TOFU data not found under {TOFU}")
    return load_task_spec(f"tofu:forget01@{TOFU}")


def test_real_tofu_splits_feed_tofu_metrics(task) -> None:  # type: ignore[no-untyped-def]
    llm = tiny_llm(seed=0)
    forget = task.forget_qa[:N]
    splits = {"forget": forget,
              "retain": [q for q in task.retain_qa if q.kind == "fact" and q.perturbed_answers][:N],
              "real_authors": [q for q in task.retain_qa if q.kind == "real_authors"][:N],
              "world_facts": [q for q in task.retain_qa if q.kind == "world_facts"][:N]}
    assert all(len(v) == N for v in splits.values())
    # Predictions given, so ROUGE is checked against rouge-score directly and no generation is needed.
    preds = {k: [q.answer if i % 2 == 0 else "I do not know." for i, q in enumerate(v)] for k, v in splits.items()}
    res = {k: tofu_split_metrics(llm, None, v, k, predictions=preds[k]) for k, v in splits.items()}
    for k, r in res.items():
        assert set(r) == {"rougeL_recall", "prob", "truth_ratio"}, k
        assert r["rougeL_recall"].value == pytest.approx(
            rouge_l_recall(preds[k], [q.answer for q in splits[k]]).value)
        assert 0.5 <= r["rougeL_recall"].value < 1.0  # half the answers are exact
        assert 0.0 < r["prob"].value < 1.0 and r["truth_ratio"].value > 0.0
    mu = tofu_model_utility(res)
    assert set(mu.details["components"]) == {f"{s}/{m}" for s in ("retain", "real_authors", "world_facts")
                                              for m in ("rougeL_recall", "prob", "truth_ratio")}
    comps = np.array(list(mu.details["components"].values()))
    assert mu.value == pytest.approx(len(comps) / np.sum(1 / comps))


def test_real_tofu_forget_quality_is_the_ks_p_value(task) -> None:  # type: ignore[no-untyped-def]
    forget = task.forget_qa[:N]
    unlearned = truth_ratio(tiny_llm(seed=0), None, forget, form="forget")
    retain = truth_ratio(tiny_llm(seed=1), None, forget, form="forget")
    fq = forget_quality(unlearned, retain)
    a, b = unlearned.details["ratios"], retain.details["ratios"]
    assert len(a) == len(b) == N
    assert fq.value == pytest.approx(ks_2samp(a, b).pvalue)
    # The same model as both sides is indistinguishable from itself.
    assert forget_quality(unlearned, unlearned).value == pytest.approx(1.0)
