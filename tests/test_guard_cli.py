"""cli/serve.py: the command's options and detector loading (the server itself is tested in test_guard_e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.serve import app, load_detector
from core.schema import save_task
from eval.tasks.offline import generate_benchmark
from guard.types import DetectorProtocol


def test_help_lists_the_options() -> None:
    out = CliRunner().invoke(app, ["--help"])
    assert out.exit_code == 0
    for opt in ("--detector", "--upstream", "--model", "--host", "--port", "--api-key", "--admin-key", "--fail-open"):
        assert opt in out.output


def test_oracle_detector_from_a_task_file(tmp_path: Path) -> None:
    path = save_task(generate_benchmark(), tmp_path / "task.json")
    det = load_detector(path, oracle=True)
    assert isinstance(det, DetectorProtocol) and det.detect("Where was " + generate_benchmark().targets[0].name + " born?").flagged


def test_missing_detector_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - the detector package decides the exact type
        load_detector(tmp_path / "nope")


@pytest.mark.parametrize(("flags", "fail_open", "port", "mode"), [
    ([], True, 9123, "template"),                                   # the YAML holds
    (["--fail-closed", "--port", "9200", "--guard-mode", "llm"], False, 9200, "llm"),  # flags win
])
def test_yaml_settings_hold_unless_a_flag_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   flags: list[str], fail_open: bool, port: int, mode: str) -> None:
    import uvicorn

    import guard.api as api_mod
    from guard.backends.scripted import ScriptedBackend

    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda a, **kw: started.update(app=a, **kw))
    monkeypatch.setattr(api_mod, "_as_backend", lambda spec: ScriptedBackend())  # no model load
    task = save_task(generate_benchmark(), tmp_path / "task.json")
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text("guard:\n  fail_open: true\n  guard_mode: template\nserver:\n  port: 9123\n  max_concurrency: 16\n")
    out = CliRunner().invoke(app, ["--detector", str(task), "--oracle", "--config", str(cfg), *flags])
    assert out.exit_code == 0, out.output
    served = started["app"]
    assert served.state.guarded.config.fail_open is fail_open and served.state.guarded.config.guard_mode == mode
    assert started["port"] == port and served.state.config.max_concurrency == 16
    assert served.state.config.watch_store is None  # an oracle task file is not a store directory
