"""The example out-of-tree families (docs/examples/moetier-mixtral, docs/examples/moetier-gpt-oss) are
discovered through their own entry points, listed by `moetier zoo list`, write their tiny checkpoints
and pass the same golden comparison against transformers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moetier.cli import main
from moetier.family import load_layout
from moetier.plugins import load_registry

from zoo.golden import check_golden

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
# (package dir, distribution, family, versions, version to test, top-k)
CASES = [
    ("moetier-mixtral", "mixtral", ("Mixtral-8x7B", "Mixtral-8x22B"), "Mixtral-8x22B", 2),
    ("moetier-gpt-oss", "gpt_oss", ("gpt-oss-20b", "gpt-oss-120b"), "gpt-oss-20b", 2),
]


def _entry_points(example: Path) -> dict[str, str]:
    """The example's own [project.entry-points.moetier] table: the test installs what the package declares."""
    import tomllib

    meta = tomllib.loads((example / "pyproject.toml").read_text())
    return meta["project"]["name"], dict(meta["project"]["entry-points"]["moetier"])


def _install(install_plugin, dirname):
    example = EXAMPLES / dirname
    dist, eps = _entry_points(example)
    (module,) = eps.values()
    install_plugin(dist, eps, package_dir=example / module)
    return dist, module


@pytest.fixture
def cleanup_modules():
    yield
    for mod in [m for m in sys.modules if m.startswith(("moetier_mixtral", "moetier_gpt_oss"))]:
        del sys.modules[mod]


@pytest.mark.parametrize("dirname,family,versions,version,top_k", CASES, ids=[c[1] for c in CASES])
def test_example_family_is_listed_and_passes_golden(install_plugin, cleanup_modules, tmp_path, capsys,
                                                    dirname, family, versions, version, top_k):
    dist, _ = _install(install_plugin, dirname)
    assert main(["zoo", "list", "--json"]) == 0
    rows = {r["family"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[family]["distribution"] == dist
    assert tuple(rows[family]["versions"]) == versions
    assert {"deepseek", "kimi", "glm", "qwen", "minimax"} <= set(rows)

    out = tmp_path / "tiny"
    assert main(["zoo", "tiny", family, str(out), "--version", version, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == version and summary["experts"] == 8 and summary["top_k"] == top_k

    registry = load_registry()
    check_golden(registry, family, version, "default", out, load_layout(str(out), registry))


def test_example_families_are_skipped_without_plugins(install_plugin, cleanup_modules, capsys):
    for dirname, *_ in CASES:
        _install(install_plugin, dirname)
    assert main(["zoo", "list", "--json", "--no-plugins"]) == 0
    rows = {r["family"] for r in json.loads(capsys.readouterr().out)}
    assert not rows & {"mixtral", "gpt_oss"} and "deepseek" in rows
    assert main(["zoo", "list", "--json"]) == 0
    assert {"mixtral", "gpt_oss"} <= {r["family"] for r in json.loads(capsys.readouterr().out)}
