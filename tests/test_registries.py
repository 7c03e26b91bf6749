"""The registries drive the code, and what users read agrees with them: README lists, config literals, CLI."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from eval.attacks import ATTACKS, attack_names
from eval.metrics.columns import COLUMNS, sheet_columns
from guard.backends import BACKENDS, BackendConfig, _load_builtin, backend_kinds
from training.methods import METHODS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _listed(label: str) -> list[str]:
    """The backticked names of the README sentence that starts with ``label``."""
    sentence = README[README.index(label):].split(".\n")[0]
    return re.findall(r"`([a-z0-9][a-z0-9-]*)`", sentence.split(":", 1)[1])


def test_readme_method_list_is_the_registry() -> None:
    assert sorted(_listed("Unlearning methods (`--method`)")) == METHODS.names()


def test_readme_attack_list_is_the_registry_by_kind() -> None:
    para = README[README.index("Attacks (`attacks:`"):].split("Backends (")[0]
    for kind in ("prompt", "weights", "probe"):
        part = para.split(f" {kind} ", 1)[1].split(";")[0]
        assert sorted(re.findall(r"`([a-z0-9-]+)`", part)) == attack_names(kind)  # type: ignore[arg-type]
    assert len(ATTACKS) == sum(len(attack_names(k)) for k in ("prompt", "weights", "probe"))  # type: ignore[arg-type]


def test_backend_kinds_agree() -> None:
    _load_builtin()
    para = README[README.index("Backends (`BackendConfig.kind`)"):].split(".\n")[0]
    listed = re.findall(r"`([a-z0-9-]+)`", para.split(":", 1)[1])
    assert sorted(listed) == BACKENDS.names() == backend_kinds()
    for name in BACKENDS.names():  # each backend owns a config class whose kind is its registered name
        cfg_cls = BACKENDS.get(name).config_class
        assert cfg_cls is not BackendConfig and issubclass(cfg_cls, BackendConfig)
        assert typing.get_args(cfg_cls.model_fields["kind"].annotation) == (name,)


def test_report_columns_are_registered_once_with_a_reading() -> None:
    cols = COLUMNS.in_order()
    assert len({c.name for c in cols}) == len(cols)
    assert all(c.description and c.needs in ("answers", "guard", "white_box", "cross_system", "attack") for c in cols)
    assert all(c.higher_is_better is not None or c.ideal is not None or c.count for c in cols)
    computed = {c.name for c in sheet_columns(guarded=True)}
    assert {"forget_fact_rate_b", "general_acc_c", "guard_fpr_c", "answer_diversity_c"} <= computed
    assert "guard_fpr_c" not in {c.name for c in sheet_columns(guarded=False)}
    assert COLUMNS.get("privleak").ideal == 0.0


def test_cli_method_choice_is_the_registry() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["train", "--method", "no-such-method", "--task", "offline"])
    assert res.exit_code != 0
    assert all(m in res.output for m in METHODS.names())
