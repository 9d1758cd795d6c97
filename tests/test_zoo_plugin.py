"""The example out-of-tree family (docs/examples/moetier-mixtral) is discovered through its own entry
point, listed by `moetier zoo list`, writes its tiny checkpoint and passes the same golden comparison."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moetier.cli import main
from moetier.plugins import load_registry

from zoo.golden import check_golden

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "moetier-mixtral"


def _entry_points_of_example() -> dict[str, str]:
    """The example's own [project.entry-points.moetier] table, so the test installs what the package declares."""
    import tomllib

    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    return dict(meta["project"]["entry-points"]["moetier"])


@pytest.fixture
def mixtral_installed(install_plugin):
    eps = _entry_points_of_example()
    assert eps == {"mixtral": "moetier_mixtral"}
    install_plugin("moetier-mixtral", eps, package_dir=EXAMPLE / "moetier_mixtral")
    yield
    for mod in [m for m in sys.modules if m.startswith("moetier_mixtral")]:
        del sys.modules[mod]


def test_example_family_is_listed_and_passes_golden(mixtral_installed, tmp_path, capsys):
    assert main(["zoo", "list", "--json"]) == 0
    rows = {r["family"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mixtral"]["distribution"] == "moetier-mixtral"
    assert rows["mixtral"]["versions"] == ["Mixtral-8x7B", "Mixtral-8x22B"]
    assert {"deepseek", "kimi", "glm", "qwen", "minimax"} <= set(rows)

    out = tmp_path / "tiny-mixtral"
    assert main(["zoo", "tiny", "mixtral", str(out), "--version", "Mixtral-8x22B"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == "Mixtral-8x22B" and summary["experts"] == 8 and summary["top_k"] == 2

    registry = load_registry()
    from moetier.family import load_layout
    layout = load_layout(str(out), registry)
    check_golden(registry, "mixtral", "Mixtral-8x22B", "default", out, layout)


def test_example_family_is_skipped_without_plugins(mixtral_installed, capsys):
    assert main(["zoo", "list", "--json", "--no-plugins"]) == 0
    rows = {r["family"] for r in json.loads(capsys.readouterr().out)}
    assert "mixtral" not in rows and "deepseek" in rows
