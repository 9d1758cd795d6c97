"""Every input a new user tried, through the real `moetier` console script: a usage error is exit 2 with
one line on stderr naming the problem, no traceback, nothing written half-way; settings that cannot be
honoured are errors, never a quiet fallback; results never claim what was not checked."""
from __future__ import annotations

import json
import os

import pytest
import torch

from cli_helpers import assert_usage_error, moetier
from conftest import INVENTORIES
from moetier.checkpoint import write_checkpoint
from moetier.cli import build_parser
from moetier.plugins import load_registry

pytest.importorskip("transformers")
ZEN4 = str(INVENTORIES / "zen4_avx512_2core.json")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen") / "ckpt"
    load_registry(no_plugins=True).family("qwen").tiny("Qwen3-30B-A3B", str(d), quant=None, seed=2)
    return d


# ---- 1. tracebacks that became errors -------------------------------------------------------------

def test_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    assert_usage_error(moetier("zoo", "show", tmp_path), "must hold a JSON object")
    (tmp_path / "config.json").write_text('{"architectures": 5, "model_type": "x"}')
    assert_usage_error(moetier("zoo", "show", tmp_path), "malformed key")


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    r = moetier("conformance", "--backend", "cpu.torch", "--report", tmp_path / "nope" / "r.json")
    assert_usage_error(r, "folder", "does not exist")
    assert "PASSED" not in r.stdout and "FAILED" not in r.stdout  # refused before running
    r = moetier("doctor", "--save-inventory", tmp_path / "nope" / "x.json")
    assert_usage_error(r, "cannot write inventory file")


def test_zoo_tiny_never_overwrites(tmp_path):
    existing = tmp_path / "file"
    existing.write_text("mine")
    assert_usage_error(moetier("zoo", "tiny", "qwen", existing), "not a folder")
    assert existing.read_text() == "mine"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_usage_error(moetier("zoo", "tiny", "qwen", full), "not empty")
    assert os.listdir(full) == ["keep.txt"]


def test_zoo_tiny_prints_a_summary_and_json_on_request(tmp_path):
    r = moetier("zoo", "tiny", "qwen", tmp_path / "a", "--version", "Qwen3-30B-A3B")
    assert r.returncode == 0 and "wrote a tiny random Qwen3-30B-A3B" in r.stdout and "{" not in r.stdout
    r = moetier("zoo", "tiny", "qwen", tmp_path / "b", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["family"] == "qwen"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".moetier-tiny-")]  # no staging left


@pytest.mark.parametrize("tokens", ["-5", "0", "many"])
def test_zoo_run_token_counts(qwen, tokens):
    assert_usage_error(moetier("zoo", "run", qwen, "--tokens", tokens, "--backend", "cpu.torch"), "--tokens")


def test_moe_block_outside_no_grad(qwen):
    """Inference with autograd enabled: MoEBlock on the chosen backend reads inputs as data."""
    from moetier.checkpoint import Checkpoint
    from moetier.family import load_layout
    from moetier.hardware import load_inventory
    from moetier.runtime.moe_block import MoEBlock
    from moetier.selection import select_backends

    reg, inv = load_registry(no_plugins=True), load_inventory()
    backend = reg.backend(select_backends(reg, inv, force=[]).for_device("cpu")).create(inv)
    layout = load_layout(qwen, reg)
    with Checkpoint(qwen) as ckpt:
        block = MoEBlock.from_checkpoint(ckpt, layout, layout.moe_layers[0].index, backend)
    x = torch.randn(3, layout.hidden_size, requires_grad=True)
    y = block(x)
    assert y.shape == (3, layout.hidden_size) and torch.isfinite(y).all()


# ---- 2. silent fallbacks that became errors -------------------------------------------------------

@pytest.mark.parametrize("value,needle", [("bogus", "is not a kernel variant; valid: avx2, avx512"),
                                          ("amx", "cannot run: it lacks amx_tile")])
def test_an_impossible_cpu_variant_is_an_error_everywhere(qwen, value, needle):
    for args in (("conformance", "-q", "--format", "fp32"), ("zoo", "run", qwen), ("doctor", "--strict"),
                 ("doctor",)):
        r = moetier(*args, "--inventory", ZEN4, MOETIER_CPU_VARIANT=value)
        assert_usage_error(r, f"MOETIER_CPU_VARIANT={value}", needle)


def test_a_lower_variant_in_any_case_is_honoured():
    r = moetier("doctor", "--json", "--inventory", ZEN4, MOETIER_CPU_VARIANT="AVX2")
    assert r.returncode == 0, r.stderr
    chosen = json.loads(r.stdout)["chosen"]["cpu"]
    assert chosen == "cpu.avx2"


def test_moetier_backend_is_honoured_by_every_command(qwen):
    for args in (("conformance", "-q", "--format", "fp32"), ("zoo", "run", qwen), ("doctor",),
                 ("bench", "kernels", "--quick")):
        assert_usage_error(moetier(*args, MOETIER_BACKEND="nonexistent"), "no backend named 'nonexistent'")
    r = moetier("zoo", "run", qwen, "--tokens", "2", MOETIER_BACKEND="cpu.torch")
    assert r.returncode == 0 and "on cpu.torch" in r.stdout, r.stdout + r.stderr


def test_every_backend_selecting_command_takes_the_same_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    wanted = {"--inventory", "--no-plugins", "--backend", "--strict"}
    selecting = {"doctor": sub["doctor"], "conformance": sub["conformance"],
                 "bench kernels": next(a for a in sub["bench"]._actions if a.dest == "bench_command").choices["kernels"],
                 "zoo run": next(a for a in sub["zoo"]._actions if a.dest == "zoo_command").choices["run"]}
    for name, p in selecting.items():
        options = {s for a in p._actions for s in a.option_strings}
        assert wanted <= options, (name, wanted - options)
        assert sum(s == "--no-plugins" for a in p._actions for s in a.option_strings) == 1


def test_zoo_show_verify_names_experts_stored_in_another_dtype(qwen, tmp_path):
    from safetensors import safe_open

    tensors = {}
    for f in sorted(qwen.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors.update({n: h.get_tensor(n) for n in h.keys()})
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    tensors[name] = tensors[name].float()
    write_checkpoint(tmp_path, tensors, config=json.loads((qwen / "config.json").read_text()))
    r = moetier("zoo", "show", tmp_path, "--verify")
    assert r.returncode == 0 and "model.layers.1.mlp.experts.3.up_proj: fp32" in r.stdout, r.stdout
    assert "1 tensor(s) stored in another format than the declared bf16" in r.stdout
    r = moetier("zoo", "run", tmp_path, "--tokens", "3", "--backend", "cpu.torch")  # still computed
    assert r.returncode == 0 and "OK" in r.stdout


# ---- 3. results that claimed what was not checked -------------------------------------------------

def test_unknown_format_is_named():
    assert_usage_error(moetier("conformance", "--format", "bogus"), "unknown weight format 'bogus'", "bf16")


def test_conformance_on_an_unknown_backend():
    r = moetier("conformance", "--backend", "nonexistent")
    assert_usage_error(r, "no backend named 'nonexistent'", "cpu.torch")
    assert r.stdout == ""


def test_a_model_named_by_its_config_json(qwen):
    r = moetier("zoo", "run", qwen / "config.json", "--tokens", "2", "--backend", "cpu.torch")
    assert r.returncode == 0 and "OK" in r.stdout and "legend" not in r.stderr, r.stdout + r.stderr
    assert "prepare s:" in r.stdout and "bound:" in r.stdout  # the columns are explained
    r = moetier("zoo", "show", qwen / "config.json")
    assert r.returncode == 0 and "Qwen3-30B-A3B" in r.stdout


def test_plain_zoo_show_checks_the_files(qwen, tmp_path):
    r = moetier("zoo", "show", qwen)
    assert r.returncode == 0 and "every header checked against its file's size" in r.stdout
    assert "not verified" in r.stdout
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text((qwen / "config.json").read_text())
    assert_usage_error(moetier("zoo", "show", only_config), "safetensors")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in qwen.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_usage_error(moetier("zoo", "show", truncated), shard.name)


# ---- 5. small things -------------------------------------------------------------------------------

def test_version():
    from moetier import __version__

    r = moetier("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"moetier {__version__}"


def test_every_argument_has_help():
    def walk(p, path):
        for a in p._actions:
            if a.dest in ("help", "version") or a.help == "==SUPPRESS==":
                continue
            if a.choices and isinstance(a.choices, dict):  # subcommands
                for name, child in a.choices.items():
                    yield from walk(child, path + [name])
                continue
            yield path, a

    missing = [(" ".join(path), a.dest) for path, a in walk(build_parser(), ["moetier"]) if not a.help]
    assert not missing, missing


def test_default_names_the_built_in_model_in_every_command_that_takes_a_model():
    """`default` is a model name wherever a MODEL is asked for, not only in `moetier run`."""
    for args, needle in ((("plan", "default", "--gpu-mem", "0"), "predicted decode"),
                         (("zoo", "show", "default"), "(qwen)"),
                         (("zoo", "run", "default", "--tokens", "4"), "OK: 4 MoE layers")):
        r = moetier(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert needle in r.stdout, (args, r.stdout[-2000:])
