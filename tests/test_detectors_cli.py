"""The ``detector`` CLI sub-app (build, eval, add-target, remove-target) with the model-free test encoder."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli.detector import app
from core.schema import ForgetTarget, QAItem
from detectors.detector import Detector
from detectors.encoder import hashing_encoder

runner = CliRunner()
FAST = ["--set", "encoder=hashing"]


def test_build_eval_add_remove(tmp_path: Path) -> None:
    out = tmp_path / "det"
    res = runner.invoke(app, ["build", "--task", "offline", "--out", str(out), "--target-fpr", "0.02",
                              "--holdout-fold", "0", *FAST])
    assert res.exit_code == 0, res.output
    assert "prompt" in res.output and (out / "manifest.json").is_file()
    det = Detector.load(out, encoder=hashing_encoder())
    assert det.config.target_fpr == 0.02 and det.meta["holdout"]["fold"] == 0

    js = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", "--detector", str(out), "--task", "offline", "--json", str(js)])
    assert res.exit_code == 0, res.output
    rep = json.loads(js.read_text())
    assert rep["mode"] == "holdout-fold"
    rates = {(g["channel"], g["group"]): g["rate"] for g in rep["groups"]}
    assert rates[("prompt", "forget_question")] >= 0.9 and rates[("prompt", "neighbour")] <= 0.05
    assert "forget_paraphrase" in res.output and "AUROC" in res.output

    tf = tmp_path / "targets.jsonl"
    t = ForgetTarget(id="person-new", kind="privacy", names=["Zorvath Quenby"], policy="Nothing about him.",
                     qa=[QAItem(question="Where was Zorvath Quenby born?", answer="In Lower Mistfall.")])
    tf.write_text(json.dumps({"record": "target", **t.model_dump(mode="json")}) + "\n")
    res = runner.invoke(app, ["add-target", "--detector", str(out), "--targets", str(tf)])
    assert res.exit_code == 0, res.output
    det = Detector.load(out, encoder=hashing_encoder())
    assert "person-new" in det.target_ids and det.detect("Where was Zorvath Quenby born?").flagged
    res = runner.invoke(app, ["remove-target", "--detector", str(out), "--id", "person-new"])
    assert res.exit_code == 0, res.output
    assert "person-new" not in Detector.load(out, encoder=hashing_encoder()).target_ids


def test_cross_fit_eval_and_errors(tmp_path: Path) -> None:
    js = tmp_path / "cv.json"
    res = runner.invoke(app, ["eval", "--task", "offline:seed=1", "--mode", "cross-fit", "--folds", "2", "--json",
                              str(js), *FAST])
    assert res.exit_code == 0, res.output
    rep = json.loads(js.read_text())
    assert rep["mode"] == "cross-fit" and rep["folds"] == 2 and len(rep["thresholds"]) == 2
    res = runner.invoke(app, ["eval", "--detector", str(tmp_path / "missing"), "--task", "offline"])
    assert res.exit_code == 2 and "not a directory" in res.output
    res = runner.invoke(app, ["build", "--task", "nonsense-spec", "--out", str(tmp_path / "x"), *FAST])
    assert res.exit_code == 2 and "error" in res.output
    res = runner.invoke(app, ["build", "--task", "offline", "--out", str(tmp_path / "x"), "--set", "top_k=1"])
    assert res.exit_code == 2 and "top_k" in res.output


def test_split_eval_reports_request_heldout_and_negatives(tmp_path: Path) -> None:
    js = tmp_path / "split.json"
    res = runner.invoke(app, ["eval", "--task", "offline", "--json", str(js), *FAST])
    assert res.exit_code == 0, res.output
    rep = json.loads(js.read_text())
    assert rep["mode"].startswith("split")
    groups = {(g["channel"], g["group"]): g for g in rep["groups"]}
    # (a), (b) and (c) all reported, each from the split; (c) is people the detector never stored.
    assert {"a:question", "b:unseen_fact", "b:paraphrase", "b:multihop"} <= {g for c, g in groups if c == "prompt"}
    assert {"c:neighbour", "c:retain", "c:benign", "c:general"} <= {g for c, g in groups if c == "prompt"}
    assert groups[("prompt", "a:question")]["rate"] >= 0.9
    assert groups[("prompt", "c:neighbour")]["n"] == rep["config"]["split"]["counts"]["negatives"]["neighbour"]
    assert groups[("leak", "b:unseen_answer")]["n"] == rep["config"]["split"]["counts"]["held_out"]["unseen_fact"]
    assert "prompt (b) vs (c)" in rep["auroc"] and "split:" in res.output
    res = runner.invoke(app, ["eval", "--task", "offline", "--mode", "nope", *FAST])
    assert res.exit_code == 2 and "cross-fit" in res.output


def _target_file(tmp_path: Path, tid: str, name: str) -> Path:
    t = ForgetTarget(id=tid, kind="privacy", names=[name], policy="Nothing about them.",
                     qa=[QAItem(question=f"Where was {name} born?", answer="In Lower Mistfall.")])
    tf = tmp_path / f"{tid}.jsonl"
    tf.write_text(json.dumps({"record": "target", **t.model_dump(mode="json")}) + "\n")
    return tf


def test_store_commands_take_the_writer_lock_and_lose_no_concurrent_change(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    import threading
    import time

    import cli.detector as cli_detector
    from core.io import writer_lock

    out = tmp_path / "det"
    assert runner.invoke(app, ["build", "--task", "offline", "--out", str(out), *FAST]).exit_code == 0
    # Held by another writer (a replica's admin save): the command waits for it, then reads what it saved.
    done: list[int] = []
    with writer_lock(out, 5.0):
        th = threading.Thread(target=lambda: done.append(runner.invoke(app, [
            "add-target", "--detector", str(out), "--targets", str(_target_file(tmp_path, "t-a", "Ilse Marrow"))]).exit_code))
        th.start()
        time.sleep(1.0)
        assert th.is_alive() and not done  # waiting, nothing written
    th.join(60)
    assert done == [0] and "t-a" in Detector.load(out, encoder=hashing_encoder()).target_ids
    # Held too long: a clear error, exit 2, the store unchanged.
    monkeypatch.setattr(cli_detector, "STORE_LOCK_TIMEOUT_S", 0.2)
    with writer_lock(out, 5.0):
        res = runner.invoke(app, ["remove-target", "--detector", str(out), "--id", "t-a"])
    assert res.exit_code == 2 and "another process has been writing" in res.output
    assert "t-a" in Detector.load(out, encoder=hashing_encoder()).target_ids
    # Two commands at once, in two processes: both changes are kept (each reads the other's save).
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", "detector", "add-target", "--detector", str(out),
                               "--targets", str(_target_file(tmp_path, tid, name))],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for tid, name in (("t-b", "Kasimir Thornova"), ("t-c", "Philippa Lindqvist"))]
    for p in procs:
        assert p.wait(120) == 0, p.stdout.read().decode()[-2000:] if p.stdout else ""
    assert {"t-a", "t-b", "t-c"} <= set(Detector.load(out, encoder=hashing_encoder()).target_ids)
