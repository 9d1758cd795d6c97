"""`moetier plan` as a user runs it: the real console script in a subprocess (exit codes, messages, no
traceback). Every run names a recorded inventory, so no CPU speed is measured here."""
from __future__ import annotations

import pytest
import torch

from cli_helpers import assert_usage_error, moetier
from conftest import INVENTORIES
from moetier.placement import ActivationStats, PlacementPlan

ZEN4 = str(INVENTORIES / "zen4_avx512_2core.json")
XEON = str(INVENTORIES / "xeon_amx_2socket_rtx4090.json")


def test_deepseek_v3_does_not_fit_512_gib_in_fp8_and_says_what_would(tmp_path):
    r = moetier("plan", "DeepSeek-V3", "--gpu-mem", "24GiB", "--cpu-mem", "512GiB", "--inventory", ZEN4,
                "--json", tmp_path / "plan.json")
    assert_usage_error(r, "tier cpu:numa0 does not fit: needs 605 GiB (649,310,914,560 bytes), has 512 GiB "
                          "(549,755,813,888 bytes) free", "routed experts (14,740 in fp8_e4m3, layers 3-60)",
                       "--cpu-format int4_g64", "--disk")
    out = r.stdout
    assert "DeepSeek-V3 (deepseek), published dimensions of DeepSeek-V3: 61 layers (58 MoE x 256 experts, top 8)" in out
    assert "118%" in out and "predicted decode" in out and "predicted prefill" in out
    assert not (tmp_path / "plan.json").exists()  # a plan that does not fit is not written


def test_deepseek_v3_in_int4_fits_and_the_plan_file_is_the_plan(tmp_path):
    path = tmp_path / "plan.json"
    r = moetier("plan", "DeepSeek-V3", "--gpu-mem", "24GiB", "--cpu-mem", "512GiB", "--cpu-format", "int4_g64",
                "--inventory", ZEN4, "--json", path, "--context", "8192")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "cpu:numa0: int4_g64 on cpu.avx512" in out and "cuda:0: fp8_e4m3 on cuda" in out
    assert "bound by cpu:numa0 read in 58 of 61 layers" in out  # decode: the CPU tier's bandwidth
    assert "bound by cpu:numa0 compute in 58 of 61 layers" in out  # an 8192-token prompt: its math
    assert "speed cpu:numa0: assumed for 2 cores" in out
    plan = PlacementPlan.load(path)
    assert plan.model.version == "DeepSeek-V3" and plan.context == 8192 and plan.strategy == "uniform"
    assert dict(plan.tier("cuda:0").reserved)["KV cache (8192 tokens x 1)"] == 61 * (512 + 64) * 2 * 8192
    assert plan.expert_count("cuda:0") + plan.expert_count("cpu:numa0") == 58 * 256
    assert {s.fmt for i in plan.moe_layers for s in plan.shards(i)} == {"fp8_e4m3", "int4_g64"}


def test_a_checkpoint_folder_is_sized_from_its_headers(tmp_path):
    ckpt = tmp_path / "tiny"
    r = moetier("zoo", "tiny", "qwen", ckpt, "--version", "Qwen3-30B-A3B")
    assert r.returncode == 0, r.stderr
    r = moetier("plan", ckpt, "--inventory", XEON, "--gpu-mem", "0", "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint {ckpt}" in r.stdout and "cpu:numa0 (detected)" in r.stdout and "cuda:0" not in r.stdout
    r = moetier("plan", ckpt / "config.json", "--inventory", XEON)
    assert r.returncode == 0 and f"config {ckpt / 'config.json'}" in r.stdout and "cuda:0" in r.stdout


def test_statistics_make_cost_the_default_and_sglang_dumps_import(tmp_path):
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 10, (2, 48, 128), generator=g)
    counts[:, :, :4] += 2000  # four very hot experts per layer
    dump = tmp_path / "expert_distribution.pt"
    torch.save({"logical_count": counts}, dump)
    path = tmp_path / "plan.json"
    r = moetier("plan", "Qwen3-30B-A3B", "--stats", dump, "--gpu-mem", "12GiB", "--inventory", XEON, "--json", path,
                "--png", tmp_path / "plan.png")
    assert r.returncode == 0, r.stderr
    assert "strategy cost" in r.stdout and "routing probabilities from the activation statistics" in r.stdout
    plan = PlacementPlan.load(path)
    for i in plan.moe_layers:
        gpu = [s for s in plan.shards(i) if s.tier == "cuda:0"]
        assert gpu and {0, 1, 2, 3} <= set(gpu[0].experts)  # the hot experts are on the accelerator
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same statistics in moetier's own format
    stats = ActivationStats(plan.moe_layers, 128, counts.sum(dim=0), counts.sum(dim=(0, 2)) // 8)
    stats.save(tmp_path / "stats.safetensors")
    r = moetier("plan", "Qwen3-30B-A3B", "--stats", tmp_path / "stats.safetensors", "--strategy", "frequency",
                "--max-per-layer", "6", "--gpu-mem", "12GiB", "--inventory", XEON, "--json", path)
    assert r.returncode == 0, r.stderr
    plan = PlacementPlan.load(path)
    assert all(len(s.experts) <= 6 for i in plan.moe_layers for s in plan.shards(i) if s.tier == "cuda:0")


def test_explicit_rules_from_the_command_line_and_a_file(tmp_path):
    rules = tmp_path / "rules.txt"
    rules.write_text("# hot layers on the card\nlayers.0-3.experts.*=gpu\n\nlayers.40-47.experts.0-15=disk  # cold\n")
    path = tmp_path / "plan.json"
    r = moetier("plan", "Qwen3-30B-A3B", "--strategy", "explicit", "--rules", rules, "--rule",
                r"model\.layers\.20\.mlp\.experts\.(5|6)\.=cpu:numa1", "--disk", "--gpu-mem", "24GiB",
                "--inventory", XEON, "--json", path)
    assert r.returncode == 0, r.stderr
    plan = PlacementPlan.load(path)
    assert all(plan.shard_of(i, e).tier == "cuda:0" for i in range(4) for e in range(128))
    assert all(plan.shard_of(i, e).tier == "disk" for i in range(40, 48) for e in range(16))
    assert plan.shard_of(20, 5).tier == plan.shard_of(20, 6).tier == "cpu:numa1"


@pytest.mark.parametrize("args,needles", [
    (("DeepSeek-V3", "--gpu-mem", "lots"), ("--gpu-mem", "cannot read 'lots' as a size")),
    (("DeepSeek-V9",), ("'DeepSeek-V9' is not a checkpoint folder", "DeepSeek-V3")),
    (("DeepSeek-V3", "--strategy", "best"), ("no placement strategy named 'best'", "front-loading")),
    (("DeepSeek-V3", "--strategy", "frequency"), ("strategy 'frequency' ranks experts by recorded activations",)),
    (("DeepSeek-V3", "--seed", "3"), ("--seed does not apply to strategy 'uniform'",)),
    (("DeepSeek-V3", "--strategy", "explicit", "--rule", "layers.1.experts.0=gpu"),
     ("'layers.1.experts.0=gpu' matches no routed expert of DeepSeek-V3",)),
    (("DeepSeek-V3", "--strategy", "explicit", "--rule", "layers.3.experts.0"), ("does not parse",)),
    (("DeepSeek-V3", "--cpu-format", "int3"), ("unknown weight format 'int3'",)),
    (("DeepSeek-V3", "--stats", "nope.pt"), ("activation statistics nope.pt: no such file",)),
    (("DeepSeek-V3", "--mix", "1-4"), ("--mix", "DECODE:PREFILL")),
    (("--context", "0", "DeepSeek-V3"), ("--context", "must be at least 1")),
    ((), ("name the MODEL to plan",)),
])
def test_usage_errors_are_one_line(args, needles):
    assert_usage_error(moetier("plan", *args, "--inventory", ZEN4), *needles)


def test_stats_for_another_model_are_refused(tmp_path):
    ActivationStats(tuple(range(3, 61)), 256).save(tmp_path / "v3.safetensors")
    r = moetier("plan", "Qwen3-30B-A3B", "--stats", tmp_path / "v3.safetensors", "--inventory", ZEN4)
    assert_usage_error(r, "are for 58 MoE layers x 256 experts", "Qwen3-30B-A3B has 48 MoE layers x 128 experts")


def test_png_without_matplotlib_names_the_extra(tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    r = moetier("plan", "Qwen3-30B-A3B", "--png", tmp_path / "p.png", "--inventory", ZEN4, PYTHONPATH=str(fake))
    assert_usage_error(r, "--png needs matplotlib", "pip install 'moetier[plot]'")


def test_the_default_context_is_what_the_model_can_attend(tmp_path):
    """4096 tokens unless the model's max_position_embeddings is smaller (the default model: 512); an
    explicit --context is taken as given."""
    for args, tokens in ((("default",), 512), (("Qwen3-30B-A3B",), 4096), (("default", "--context", "100"), 100)):
        r = moetier("plan", *args, "--gpu-mem", "0", "--cpu-mem", "200GiB", "--json", tmp_path / "p.json")
        assert r.returncode == 0, r.stderr
        assert f"1 sequence(s) x {tokens} tokens of context" in r.stdout, r.stdout
        assert PlacementPlan.load(tmp_path / "p.json").context == tokens
