"""compare's vLLM generator: the choice and its error, the engine pool, the report's header, and (embedded model, vLLM
on CPU) answers equal to transformers' on at least 95% of prompts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from core.models import tiny_llm
from eval.compare import CompareConfig
from eval.report import Report, render_html, render_markdown
from eval.systems import VLLMEngines, check_generator, generator_label, model_system


def test_generator_defaults_to_transformers_and_names_what_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import ConfigError, load_config

    assert CompareConfig().generator == "transformers"
    assert load_config(CompareConfig, None, ["generator=vllm"]).generator == "vllm"
    with pytest.raises(ConfigError, match="'transformers' or 'vllm'"):
        load_config(CompareConfig, None, ["generator=llama.cpp"])
    import guard.backends.vllm as gv

    monkeypatch.setattr(gv, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match=r"unlearn-guard\[vllm\].*accepted generators: transformers"):
        check_generator("vllm")
    check_generator("transformers")


def test_report_states_the_generator() -> None:
    label = generator_label("transformers")
    assert label.startswith("transformers ") and "greedy" in label
    r = Report(systems=["a"], values={"a": {}}, generator=label)
    assert f"Generator: {label}." in render_markdown(r)
    assert "Generator: transformers" in render_html(r)
    assert json.loads(r.model_dump_json())["generator"] == label


class _FakeEngine:
    """Stands in for guard.backends.vllm.VLLMBackend: records starts and stops, echoes prompts."""

    log: list[str] = []

    def __init__(self, model: str, **kw: Any) -> None:
        self.model = model
        _FakeEngine.log.append(f"start {Path(model).name}")

    def generate_batch(self, batch: Any, params: Any) -> list[Any]:
        from guard.backends.base import GenOutput

        return [GenOutput(text=f"{Path(self.model).name}:{m[-1]['content']}") for m in batch]

    def close(self) -> None:
        _FakeEngine.log.append(f"stop {Path(self.model).name}")


def test_engine_pool_stops_engines_together_and_frees_attacked_copies(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    import guard.backends.vllm as gv

    monkeypatch.setattr(gv, "VLLMBackend", _FakeEngine)
    _FakeEngine.log = []
    pool = VLLMEngines(max_live=2)
    with pool.use(tmp_path / "a"), pool.use(tmp_path / "b"), pool.use(tmp_path / "c"):
        pass  # all three busy at once: none may stop, the pool grows past max_live
    assert _FakeEngine.log == ["start a", "start b", "start c"]
    with pool.use(tmp_path / "a"):  # running: reused
        pass
    with pool.use(tmp_path / "d"):  # one more than max_live: all stop (vLLM tears down its state for every engine)
        pass
    assert _FakeEngine.log[3:] == ["stop a", "stop b", "stop c", "start d"]
    # a model changed in memory (no path): saved, answered with once, then its copy is gone and its engine stops
    # with the others when the pool next needs room
    llm = tiny_llm()
    sys_ = model_system("attacked", llm, engines=pool)
    assert [r.text for r in sys_.respond(["hi", [{"role": "user", "content": "yo"}]])][1].endswith(":yo")
    saved = next(k for k in pool._live if "unlearn-guard-vllm-" in k)
    assert not pool._saved and not Path(saved).exists() and _FakeEngine.log[-1].startswith("start unlearn-guard-vllm-")
    with pool.use(tmp_path / "e"):
        pass
    assert _FakeEngine.log[-3:] == ["stop d", f"stop {Path(saved).name}", "start e"] and pool.starts == 6
    pool.close()
    assert not pool._live and _FakeEngine.log[-1] == "stop e"


def test_engine_pool_never_answers_with_a_freed_models_weights(tmp_path: Path) -> None:
    """``id()`` of a freed model can come back for another one: the saved copy of the old one must not be reused."""
    import weakref

    pool = VLLMEngines()
    llm = tiny_llm(seed=1)
    first = pool.model_dir(llm)
    assert pool.model_dir(llm) == first  # the same live model: saved once

    class _Gone:
        pass

    dead = weakref.ref(_Gone())  # a model that no longer exists, whose id the next one got
    pool._saved[id(llm.model)] = (first, dead)
    second = pool.model_dir(llm)
    assert second != first and not first.exists() and second.exists()
    pool.close()
    assert not second.exists()


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm (optional extra) is not installed")
    from guard.backends.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vllm is installed but does not import here")


@pytest.mark.slow
@pytest.mark.integration
def test_vllm_answers_equal_transformers_on_the_embedded_model(tmp_path: Path) -> None:
    """Greedy, fp32 both sides, through compare's generation function (System.respond) and the guard."""
    _require_vllm()
    from core.models import ModelNotFoundError, load_llm
    from detectors.oracle import OracleDetector
    from eval.bench.vllm_agreement import benchmark_prompts
    from eval.systems import guarded_system
    from eval.tasks.offline import BenchmarkConfig, generate_benchmark
    from guard.config import GuardConfig

    try:
        llm = load_llm("smollm2-135m-instruct")
    except ModelNotFoundError as e:
        pytest.skip(f"embedded model unavailable: {e}")
    prompts: list[Any] = [p for _, p in benchmark_prompts(10, data_root=tmp_path)]  # offline benchmark only
    prompts.append([{"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": "What is the capital of France?"}])
    hf = [r.text for r in model_system("hf", llm).respond(prompts, 24)]
    pool = VLLMEngines(max_live=1)
    try:
        vl = [r.text for r in model_system("vllm", llm, engines=pool).respond(prompts, 24)]
        same = sum(a == b for a, b in zip(hf, vl, strict=True))
        assert same >= 0.95 * len(prompts), [(a, b) for a, b in zip(hf, vl, strict=True) if a != b]
        # the guard on both generators: target and guard model (here the same model, so the same engine)
        task = generate_benchmark(BenchmarkConfig())
        asked = [task.benign_questions[0], *[t.qa[0].question for t in task.targets]]
        gcfg = GuardConfig(max_new_tokens=24, guard_mode="llm")
        want = guarded_system("guard", llm, OracleDetector(task), task, gcfg).respond(asked, 24)
        got = guarded_system("guard", llm, OracleDetector(task), task, gcfg, engines=pool).respond(asked, 24)
        assert not got[0].trace.flagged and got[0].text == vl[prompts.index(asked[0])]  # the round-robin's 4th
        assert all(r.trace.flagged for r in got[1:])
        assert [(r.text, r.source) for r in got] == [(r.text, r.source) for r in want]
        assert pool.starts == 1  # the guard's target and guard model reused the running engine
    finally:
        pool.close()
