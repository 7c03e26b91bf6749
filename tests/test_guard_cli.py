"""cli/serve.py: the command's options and detector loading (the server itself is tested in test_guard_e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.serve import app, load_detector
from core.schema import save_task
from eval.benchmark import generate_benchmark
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
