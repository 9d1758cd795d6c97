"""Build the amx kernel variant over the software tile unit in this folder, for tests on CPUs without
AMX. Same sources and flags as the real amx build (kernels/build_variants.py) minus the -mamx-* flags,
plus MOETIER_AMX_EMULATOR: the module is `_moe_amx_emulated` and exposes `emulated_tile_dots()`."""
from __future__ import annotations

import importlib.util
import runpy
import sysconfig
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NAME = "_moe_amx_emulated"


def build(out_dir: Path) -> ModuleType:
    """Compile (about 20 s) into `out_dir` and import the module."""
    from pybind11.setup_helpers import Pybind11Extension, build_ext
    from setuptools import Distribution

    b = runpy.run_path(str(ROOT / "kernels" / "build_variants.py"))
    flags = [f for f in b["KERNEL_VARIANTS"]["amx"] if not f.startswith("-mamx")]
    ext = Pybind11Extension(
        NAME, [str(ROOT / s) for s in b["KERNEL_SOURCES"]], cxx_std=17,
        include_dirs=[str(ROOT / "kernels"), str(HERE)],
        define_macros=b["define_macros"]("amx") + [("MOETIER_AMX_EMULATOR", "1")],
        extra_compile_args=[*b["COMPILE_ARGS"], *flags], extra_link_args=b["LINK_ARGS"])
    dist = Distribution({"name": "moetier-amx-emulated", "ext_modules": [ext]})
    cmd = build_ext(dist)
    cmd.build_lib = str(out_dir)
    cmd.build_temp = str(out_dir / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    path = out_dir / (NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
