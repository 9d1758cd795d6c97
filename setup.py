"""Build of the compiled parts: the CPUID probe and one kernel module per ISA variant.

The variants are compiled with explicit feature flags, never -march=native, so a wheel built on one
machine runs on every CPU that has the variant's features; the loader imports only a variant the host
can execute.
"""
import os
import platform
import runpy

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

ParallelCompile("MOETIER_BUILD_JOBS", default=0).install()

IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# The variants' flags live next to the kernels (the tests build an emulated AMX variant from them too).
BUILD = runpy.run_path(os.path.join("kernels", "build_variants.py"))


def packages():
    found = ["moetier"] + [f"moetier.{p}" for p in find_packages("core")]
    found += ["moetier.backends"] + [f"moetier.backends.{p}" for p in find_packages("backends")]
    found += ["moetier.model_zoo"] + [f"moetier.model_zoo.{p}" for p in find_packages("model_zoo")]
    # The default model's checkpoint and tokenizer: a data folder, listed so setuptools ships it as one.
    found.append("moetier.model_zoo.default_model.data")
    return found


def extensions():
    if not IS_X86:
        return []
    exts = [
        # Baseline x86-64 only: it must run on every CPU, since it decides which variant may load.
        Pybind11Extension("moetier.hardware._cpuid", ["kernels/cpuid/cpuid.cpp"], cxx_std=17,
                          depends=["kernels/amx_permission.h"], extra_compile_args=["-O2"]),
        # The machine-limit probes of `moetier bench`: baseline x86-64 as well; its wide loops are
        # target-attributed functions, called only on CPUs that have the feature.
        Pybind11Extension("moetier.bench._probes", ["kernels/bench_probes/probes.cpp"], cxx_std=17,
                          depends=["kernels/huge_pages.h"], extra_compile_args=["-O2", "-pthread"],
                          extra_link_args=["-pthread"]),
    ]
    if all(os.path.exists(s) for s in BUILD["KERNEL_SOURCES"]):
        for variant, flags in BUILD["KERNEL_VARIANTS"].items():
            exts.append(Pybind11Extension(
                f"moetier.backends.native._moe_{variant}", BUILD["KERNEL_SOURCES"], cxx_std=17,
                include_dirs=["kernels"], depends=BUILD["KERNEL_HEADERS"], define_macros=BUILD["define_macros"](variant),
                extra_compile_args=[*BUILD["COMPILE_ARGS"], *flags], extra_link_args=BUILD["LINK_ARGS"],
            ))
    return exts


class ParallelBuildExt(build_ext):
    """Builds the extensions side by side: each kernel variant is one large translation unit, so
    ParallelCompile (parallel objects within an extension) leaves all cores but one idle."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


setup(packages=packages(), ext_modules=extensions(), cmdclass={"build_ext": ParallelBuildExt})
