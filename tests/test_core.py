"""Schema round trips and errors, atomic writes, config overrides, registry, model resolution."""

from __future__ import annotations

import json
import os

import pytest

from core.config import ConfigError, apply_overrides, load_config
from core.io import atomic_dir, atomic_write_text, recover_dir
from core.models import ModelNotFoundError, load_llm, resolve_llm_path, tiny_llm
from core.registry import Registry, UnknownNameError
from core.schema import (
    ForgetTarget,
    ForgetTask,
    MCQItem,
    QAItem,
    SchemaError,
    load_targets,
    load_task,
    save_task,
)


def _task() -> ForgetTask:
    t = ForgetTarget(id="p1", kind="privacy", names=["Ann Lee", "A. Lee"], policy="Do not reveal Ann Lee's data.",
                     texts=["Ann Lee was born in X."],
                     qa=[QAItem(question="Where was Ann Lee born?", answer="In X.", perturbed_answers=["In Y."])],
                     mcq=[MCQItem(question="Q?", choices=["a", "b"], answer=1)])
    return ForgetTask(name="t", targets=[t], retain_qa=[QAItem(question="Q2?", answer="A2")],
                      retain_texts=["r"], benign_questions=["What is 2+2?"], holdout_texts=["h"])


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_task_round_trip(tmp_path, suffix):
    task = _task()
    path = save_task(task, tmp_path / f"task{suffix}")
    assert load_task(path) == task


def test_jsonl_error_names_file_record_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"record": "task", "name": "x"}) + "\n"
                 + json.dumps({"record": "target", "id": "p1", "kind": "privacy", "names": ["A"], "policy": "p",
                               "qa": [{"question": "q"}]}) + "\n")
    with pytest.raises(SchemaError) as e:
        load_task(p)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "line 2" in msg and "qa.0.answer" in msg and "p1" in msg


def test_json_error_names_record_index_and_field(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"name": "x", "targets": [
        {"id": "a", "kind": "privacy", "names": ["A"], "policy": "p"},
        {"id": "b", "kind": "weird", "names": ["B"], "policy": "p"}]}))
    with pytest.raises(SchemaError, match=r"bad.json: targets\[1\]: field kind"):
        load_task(p)


def test_unknown_record_type_and_bad_mcq_answer(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps({"record": "nonsense"}) + "\n")
    with pytest.raises(SchemaError, match="accepted: task, target"):
        load_task(p)
    with pytest.raises(ValueError, match="outside choices"):
        MCQItem(question="q", choices=["a", "b"], answer=2)


def test_duplicate_target_ids_rejected():
    t = _task().targets[0]
    with pytest.raises(ValueError, match="duplicate target id"):
        ForgetTask(name="d", targets=[t, t])


def test_load_targets_jsonl(tmp_path):
    p = tmp_path / "targets.jsonl"
    p.write_text(_task().targets[0].model_dump_json() + "\n")
    assert load_targets(p) == _task().targets


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    d = tmp_path / "store"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(d) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("crash mid-write")
    assert (d / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    atomic_write_text(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").read_text() == "x"


def test_config_overrides_parse_yaml_values(tmp_path):
    from pydantic import BaseModel

    class Inner(BaseModel):
        r: int = 1

    class Cfg(BaseModel):
        lr: float = 1.0
        name: str = "a"
        inner: Inner = Inner()

    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.5\n")
    cfg = load_config(Cfg, y, ["inner.r=8", "name=b"])
    assert (cfg.lr, cfg.name, cfg.inner.r) == (0.5, "b", 8)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Cfg, None, ["lr"])
    with pytest.raises(ConfigError, match="lr"):
        load_config(Cfg, None, ["lr=abc"])


def test_registry_lists_known_names():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    assert reg.get("a") == 1
    with pytest.raises(UnknownNameError, match="unknown widget 'b'; known: a"):
        reg.get("b")


def test_model_resolution_errors_name_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        resolve_llm_path("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_llm_path(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="offline"):
        load_llm("someorg/some-model-that-is-not-cached")


def test_tiny_llm_is_seeded_and_has_chat_template():
    a, b = tiny_llm(3), tiny_llm(3)
    assert all((p == q).all() for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
    text = a.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert a.num_layers == 2 and len(a.tokenizer) <= 1000
    ids = a.tokenizer("Zyxw ünïcode 123")["input_ids"]
    assert a.tokenizer.decode(ids) == "Zyxw ünïcode 123"  # byte-level: no unknown tokens


def test_local_directory_loads(tmp_path):
    llm = tiny_llm(1)
    llm.model.save_pretrained(tmp_path / "m")
    llm.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_llm(str(tmp_path / "m"))
    assert loaded.path == tmp_path / "m" and loaded.tokenizer.padding_side == "left"
    assert all((p == q).all() for p, q in zip(llm.model.parameters(), loaded.model.parameters(), strict=True))


def test_recover_dir_restores_the_newest_valid_old_version(tmp_path):
    d = tmp_path / "store"
    for i, ok in enumerate(["bad", "good-old", "good-new"]):
        old = tmp_path / f".store.old-{100 + i}-1"
        old.mkdir()
        (old / "v").write_text(ok)
        os.utime(old, (1000 + i, 1000 + i))
    assert recover_dir(d, lambda p: (p / "v").read_text() == "good-old") is True
    assert (d / "v").read_text() == "good-old"
    assert recover_dir(d) is False  # present: nothing to do
    with atomic_dir(d) as tmp:  # a later write replaces it and leaves no temp dir behind
        (tmp / "v").write_text("fresh")
    assert (d / "v").read_text() == "fresh"
    assert not list(tmp_path.glob(".store.*.tmp"))
