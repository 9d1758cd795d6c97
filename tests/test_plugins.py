"""Plugin loading: third-party discovery through entry points, strictness, allow-list."""
import pytest

from moetier.conformance import run_suite
from moetier.errors import PluginError
from moetier.hardware import load_inventory
from moetier.plugins import load_registry

from conftest import HERE, INVENTORIES

PLUGIN_PKG = HERE / "plugin_pkg" / "moetier_example_plugin"
BUILTIN_BACKENDS = {"cpu.torch", "cpu.avx2", "cpu.avx512", "cpu.amx", "cpu.numba", "cuda", "rocm", "ascend"}


def test_builtins_are_registered_through_the_entry_point_group():
    reg = load_registry(no_plugins=True)
    assert BUILTIN_BACKENDS <= set(reg.backends)
    assert all(p.builtin and p.distribution == "moetier" for p in reg.plugins)
    assert {"cpu_torch", "cpu_native", "accelerators"} <= {p.name for p in reg.plugins}
    assert {"dram", "accelerator-memory", "disk"} <= set(reg.tiers)


def test_out_of_tree_plugin_registers_a_backend_and_a_family(install_plugin):
    install_plugin("moetier-example-plugin", {"example": "moetier_example_plugin"}, package_dir=PLUGIN_PKG)
    reg = load_registry()
    assert "example.scalar" in reg.backends and "example-moe" in reg.families
    info = next(p for p in reg.plugins if p.name == "example")
    assert not info.builtin and info.distribution == "moetier-example-plugin"
    assert reg.owners[("backend", "example.scalar")] == "example"
    fam = reg.family("example-moe")
    assert fam.match({"model_type": "example_moe"}) == "Example-MoE" and fam.match({"model_type": "x"}) is None
    # The third party runs the same conformance suite on its backend, through the registry.
    report = run_suite(["example.scalar"], registry=reg, inventory=load_inventory(INVENTORIES / "zen4_avx512_2core.json"),
                       formats=["int8"])
    assert report.ok and report.n_run > 40, report.summary()


def test_allow_list_and_no_plugins_restrict_outside_plugins(install_plugin, monkeypatch):
    install_plugin("moetier-example-plugin", {"example": "moetier_example_plugin"}, package_dir=PLUGIN_PKG)
    reg = load_registry(no_plugins=True)
    assert "example.scalar" not in reg.backends
    assert [p.name for p in reg.skipped] == ["example"]
    monkeypatch.setenv("MOETIER_PLUGINS", "someone_else")
    assert "example.scalar" not in load_registry().backends
    monkeypatch.setenv("MOETIER_PLUGINS", "example")
    assert "example.scalar" in load_registry().backends
    assert BUILTIN_BACKENDS <= set(load_registry().backends)  # built-ins are never filtered


def test_import_failure_is_skipped_with_a_warning_naming_the_plugin(install_plugin):
    install_plugin("oot-broken", {"broken": "oot_broken"}, {"oot_broken.py": "import no_such_module_xyz\n"})
    with pytest.warns(RuntimeWarning, match="plugin 'broken' .*no_such_module_xyz"):
        reg = load_registry()
    assert [f.name for f in reg.failed] == ["broken"]
    assert "No module named 'no_such_module_xyz'" in reg.failed[0].error
    assert BUILTIN_BACKENDS <= set(reg.backends)


def test_unknown_hook_is_an_error_naming_the_plugin(install_plugin):
    src = "import moetier\n@moetier.hookimpl\ndef moetier_register_backend(register):\n    pass\n"
    install_plugin("oot-typo", {"typo": "oot_typo"}, {"oot_typo.py": src})
    with pytest.raises(PluginError, match="plugin 'typo' implements unknown hook 'moetier_register_backend'"):
        load_registry()


def test_two_plugins_registering_one_name_is_an_error(install_plugin):
    src = ("import moetier\nfrom moetier import BackendSpec, Probe\n@moetier.hookimpl\n"
           "def moetier_register_backends(register):\n"
           "    register(BackendSpec('cpu.torch', 'cpu', ('fp32',), lambda inv: Probe(1, 'x'), lambda inv: None))\n")
    install_plugin("oot-dup", {"dup": "oot_dup"}, {"oot_dup.py": src})
    with pytest.raises(PluginError, match="backend name 'cpu.torch' is registered twice: by plugin 'cpu_torch' and by plugin 'dup'"):
        load_registry()


def test_registering_the_wrong_type_is_an_error(install_plugin):
    src = "import moetier\n@moetier.hookimpl\ndef moetier_register_families(register):\n    register({'name': 'x'})\n"
    install_plugin("oot-wrongtype", {"wrongtype": "oot_wrongtype"}, {"oot_wrongtype.py": src})
    with pytest.raises(PluginError, match="plugin 'wrongtype' registered a dict as a family"):
        load_registry()
