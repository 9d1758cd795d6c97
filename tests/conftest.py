"""Shared fixtures: recorded inventories and a way to install plugin packages for one test."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
INVENTORIES = HERE / "inventories"


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """install_plugin(dist, entry_points={name: "module"}, sources={"mod.py": text} or a package dir)
    puts the sources and a dist-info on sys.path, exactly what `pip install` leaves behind, so
    importlib.metadata finds the entry points. Undone after the test."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install(dist: str, entry_points: dict[str, str], sources: dict[str, str] | None = None,
                package_dir: Path | None = None) -> Path:
        info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        lines = ["[moetier]"] + [f"{k} = {v}" for k, v in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for name, text in (sources or {}).items():
            (site / name).write_text(text)
        if package_dir is not None:
            shutil.copytree(package_dir, site / package_dir.name)
        return site

    yield install
    for mod in [m for m in sys.modules if m.startswith(("moetier_example_plugin", "oot_"))]:
        del sys.modules[mod]
