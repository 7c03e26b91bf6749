"""The detector on real TOFU data (../shared/data/tofu); skipped when the data or the loader is absent."""

from __future__ import annotations

import pytest

from detectors.config import DetectorConfig
from detectors.encoder import Encoder
from detectors.evaluation import cross_validate, split_fold

loaders = pytest.importorskip("eval.tasks")
pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def tofu_task():  # type: ignore[no-untyped-def]
    root = loaders.default_data_root() / "tofu"
    if not (root / "forget01.json").is_file():
        pytest.skip(f"TOFU data not found under {root}")
    task = loaders.load_tofu(root, "forget01")
    # Keep the test quick: every 10th retain QA (about 400 of 4177), all forget QA.
    return task.model_copy(update={"retain_qa": task.retain_qa[::10]})


def test_tofu_names_and_split(tofu_task) -> None:  # type: ignore[no-untyped-def]
    assert [t.names[0] for t in tofu_task.targets] == ["Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"]
    split = split_fold(tofu_task, 0, 2)
    stored = {q.question for t in split.train_task.targets for q in t.qa}
    assert stored.isdisjoint(split.pos["forget_question"]) and stored.isdisjoint(split.pos["forget_paraphrase"])
    assert all(q.paraphrased_question is None for t in split.train_task.targets for q in t.qa)


def test_tofu_forget01_held_out(tofu_task, encoder: Encoder) -> None:  # type: ignore[no-untyped-def]
    rep = cross_validate(tofu_task, DetectorConfig(), encoder, folds=2)
    print("\n" + rep.table())
    assert rep.rate("forget_paraphrase") >= 0.95
    assert rep.rate("forget_question") >= 0.85
    assert rep.rate("retain") <= 0.03
    assert rep.rate("real_authors") <= 0.02 and rep.rate("world_facts") <= 0.02
    assert rep.auroc["prompt (all negatives)"] >= 0.98
