"""The default model: its corpus split, its training script (a few real steps), and the shipped checkpoint
(layout moetier recognizes, transformers loads it and generates, routing skew, perplexity per weight format)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open

from moetier.errors import CheckpointError
from moetier.formats import dequantize, quantize
from moetier.model_zoo import default_model
from moetier.model_zoo.default_model import corpus, evaluate, train
from moetier.placement import ActivationStats, spread_order

MOETIER = Path(sys.executable).parent / "moetier"


# ---- corpus -----------------------------------------------------------------------------------------------

def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_corpus_lists_sorted_sources_and_splits_by_path_alone(tmp_path):
    names = [f"pkg/mod{i}.py" for i in range(60)] + ["a.py", "z/b.py"]
    _tree(tmp_path, {n: b"x = 1\n" for n in names} | {
        "test/test_x.py": b"x\n", "pkg/tests/t.py": b"x\n", "encodings/cp1.py": b"x\n", "notes.txt": b"x\n",
        "latin1.py": "s = '\xe9'\n".encode("latin-1")})
    files = corpus.source_files(root=tmp_path)
    rels = [f.rel for f in files]
    assert rels == sorted(names + ["latin1.py"])  # excluded dirs and non-.py files are not listed
    assert [f.read() for f in files if f.rel == "latin1.py"] == [None]  # not UTF-8: skipped by texts()
    heldout = {f.rel for f in corpus.source_files("heldout", root=tmp_path)}
    assert heldout == {r for r in rels if corpus.split_of(r) == "heldout"}
    assert 0 < len(heldout) < len(rels)
    # Adding or removing other files never moves a file across the split.
    _tree(tmp_path, {f"new/extra{i}.py": b"y = 2\n" for i in range(20)})
    (tmp_path / "a.py").unlink()
    assert heldout - {"a.py"} == {f.rel for f in corpus.source_files("heldout", root=tmp_path)} - {
        f"new/extra{i}.py" for i in range(20)}
    with pytest.raises(ValueError, match="split must be"):
        corpus.source_files("validation", root=tmp_path)


def test_stdlib_corpus_has_both_splits():
    train_files, heldout_files = corpus.source_files("train"), corpus.source_files("heldout")
    assert len(train_files) > 300 and len(heldout_files) > 10
    # 5% by hash of the path: a binomial share, well inside 2-10% for hundreds of files.
    assert 0.02 < len(heldout_files) / (len(train_files) + len(heldout_files)) < 0.10


# ---- the training script ----------------------------------------------------------------------------------

def test_training_script_runs_and_the_loss_decreases(tmp_path):
    model_spec, spec = train.PRESETS["smoke"]
    result = train.train(tmp_path, model_spec, spec, log=lambda s: None)
    losses = result.step_losses
    assert len(losses) == spec.steps and all(math.isfinite(x) for x in losses)
    assert result.tokens_seen == spec.steps * spec.batch_size * spec.seq_len
    # Steps start at the uniform guess ln(512) = 6.24 nats and reach about 5.3 in 40 steps; 0.5 is a
    # margin no broken optimizer, data pipeline or loss wiring would clear.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    held = [p.heldout_loss for p in result.curve if p.heldout_loss is not None]
    assert held and held[-1] < math.log(model_spec.vocab_size) - 0.5
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["tokens_seen"] == result.tokens_seen and len(log["curve"]) == len(result.curve)

    # What it saved is a Qwen3-MoE checkpoint transformers loads, with a tokenizer AutoTokenizer loads.
    model = evaluate.load_model(tmp_path)
    tok = evaluate.load_tokenizer(tmp_path)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == model_spec.num_experts
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names


def test_training_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path), "--steps", "0"])
    assert e.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()


# ---- the shipped checkpoint -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    folder = default_model.checkpoint_dir()
    return folder, evaluate.load_model(folder), evaluate.load_tokenizer(folder)


@pytest.fixture(scope="module")
def sample(shipped):
    # 4 evenly spaced held-out windows of 512 tokens: about 2k tokens, seconds per format.
    return evaluate.heldout_windows(shipped[2], max_windows=4)


def test_checkpoint_dir_names_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "DATA_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors.*retrain"):
        default_model.checkpoint_dir()


def test_shipped_checkpoint_is_a_bf16_per_expert_qwen3_moe_under_30_mb(shipped):
    folder, model, _ = shipped
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    E, L = config["num_experts"], config["num_hidden_layers"]
    assert 16 <= E <= 64 and 2 <= config["num_experts_per_tok"] <= 4
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 25e6
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert size <= 30 * 2**20
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    for i in range(L):
        assert f"model.layers.{i}.mlp.gate.weight" in names
        for j in range(E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{i}.mlp.experts.{j}.{proj}.weight" in names


def test_zoo_show_verify_accepts_the_shipped_checkpoint(shipped):
    folder = shipped[0]
    run = subprocess.run([str(MOETIER), "zoo", "show", str(folder), "--verify", "--json"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    shown = json.loads(run.stdout)
    config = json.loads((folder / "config.json").read_text())
    assert shown["family"] == "qwen" and shown["experts"] == config["num_experts"]
    assert shown["moe_layers"] == config["num_hidden_layers"]
    assert shown["verified_matrices"] == 3 * config["num_experts"] * config["num_hidden_layers"]
    assert shown["quantization"] == "none:bf16" and shown["dtype_differs"] == []


def test_shipped_model_generates_python_deterministically(shipped):
    _, model, tok = shipped
    first = evaluate.generate(model, tok, "def fibonacci(n):", max_new_tokens=32)
    assert evaluate.generate(model, tok, "def fibonacci(n):", max_new_tokens=32) == first
    # The model learned Python's shape: a def's body starts on the next line, indented.
    assert first.startswith("\n    "), first
    assert len(tok(first)["input_ids"]) >= 16


def test_route_counts_match_transformers_router_logits(shipped, sample):
    _, model, _ = shipped
    rows = sample[:2]
    stats = evaluate.route_counts(model, rows)
    k, E, L = model.config.num_experts_per_tok, model.config.num_experts, model.config.num_hidden_layers
    assert isinstance(stats, ActivationStats) and stats.layers == tuple(range(L)) and stats.num_experts == E
    assert torch.equal(stats.tokens, torch.full((L,), rows.numel()))
    assert torch.equal(stats.counts.sum(1), torch.full((L,), rows.numel() * k))
    with torch.no_grad():
        logits = model(input_ids=rows, output_router_logits=True).router_logits  # transformers' own output
    expect = torch.stack([torch.bincount(lg.topk(k, dim=-1).indices.reshape(-1), minlength=E) for lg in logits])
    assert torch.equal(stats.counts, expect)


def _stats(counts) -> ActivationStats:
    counts = torch.tensor(counts)
    return ActivationStats(tuple(range(counts.shape[0])), counts.shape[1], counts)


def test_skew_and_hot_share_measures():
    uniform = evaluate.skew(_stats([[10] * 32]))[0]
    assert uniform.top_quarter_share == pytest.approx(0.25) and uniform.max_over_mean == pytest.approx(1.0)
    lopsided = evaluate.skew(_stats([[7, 1, 0, 0]]))[0]
    assert lopsided.top_quarter_share == pytest.approx(7 / 8) and lopsided.max_over_mean == pytest.approx(3.5)
    assert lopsided.idle == 2 and lopsided.min_over_mean == 0
    # Experts chosen on one text (0 and 1 hottest), judged on another where 2 and 3 are.
    assert evaluate.hot_share(_stats([[9, 5, 1, 1, 0, 0, 0, 0]]), _stats([[1, 2, 3, 4, 0, 0, 0, 0]])) == [0.3]


def test_shipped_routing_is_skewed_but_not_collapsed(shipped, sample):
    _, model, _ = shipped
    for s in evaluate.skew(evaluate.route_counts(model, sample)):
        # Uniform loads would give 0.25; a collapsed router would leave experts idle. Measured: 0.38-0.48 per
        # layer on this sample, 0.34-0.37 on the whole held-out split, no idle expert (docs/default-model.md).
        assert s.top_quarter_share > 0.30, s
        assert s.idle == 0, s


def test_round_trip_rewrites_each_on_disk_matrix(shipped):
    folder = shipped[0]
    model = evaluate.round_trip_experts_(evaluate.load_model(folder), "int4_g64")
    inter = model.config.moe_intermediate_size
    experts = model.model.layers[1].mlp.experts
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for proj, got in (("gate_proj", experts.gate_up_proj[5, :inter]), ("up_proj", experts.gate_up_proj[5, inter:]),
                          ("down_proj", experts.down_proj[5])):
            w = f.get_tensor(f"model.layers.1.mlp.experts.5.{proj}.weight").float()
            want = dequantize(quantize(w, "int4_g64"))
            assert torch.equal(got, want) and not torch.equal(got, w)


# Bounds on perplexity(format) / perplexity(bf16) over the 4-window sample, only routed experts converted.
# Measured (docs/default-model.md), whole held-out split / this sample: fp8_e4m3 1.0001 / 1.0007, int8 1.0000 /
# 1.0001, int4_g32 1.0011 / 1.0023, int4_g64 1.0017 / 1.0035, int4_g128 1.0021 / 1.0023. The ratio is paired
# (same tokens, same model but for the experts), so it moves little with the sample or the machine. Each
# bound is about 4x the larger measured excess and ordered by weight error: 8-bit formats (255 levels per row,
# or 3 mantissa bits per 128x128 block) err far less than int4 (15 levels), and a wider int4 group's scale is
# set by a larger outlier. All are tighter than the goals (int8 within +1%, int4_g64 within +5%), so a change
# that breaks a goal, or makes a format several times worse than it is, fails here.
RATIO_BOUNDS = {"fp8_e4m3": 1.005, "int8": 1.005, "int4_g32": 1.01, "int4_g64": 1.015, "int4_g128": 1.02}


def test_perplexity_per_format_within_bounds(sample):
    ppl = evaluate.perplexity_table(evaluate.transformers_factory(), sample, ("bf16", *RATIO_BOUNDS))
    # Measured 84 on this sample (52 on the whole split); a unigram model of the training split scores 990
    # here and the model after 100 of its 1000 steps about 330. 200 leaves room for the sample's windows to
    # shift on another Python version's standard library and still fails a model that learned little.
    assert ppl["bf16"] < 200, ppl
    for fmt, bound in RATIO_BOUNDS.items():
        assert ppl[fmt] / ppl["bf16"] <= bound, (fmt, ppl)
    assert ppl["int4_g32"] != ppl["bf16"]  # the round trip changed the model


# ---- placement plans judged on held-out text --------------------------------------------------------------

INVENTORIES = Path(__file__).parent / "inventories"


@pytest.fixture(scope="module")
def train_sample(shipped):
    return evaluate.corpus_windows(shipped[2], "train", max_windows=4)


def test_placement_plans_hold_a_quarter_of_the_experts_and_rank_by_the_statistics(shipped, sample, train_sample):
    _, model, _ = shipped
    train_stats = evaluate.route_counts(model, train_sample)
    judged = evaluate.placement_shares(train_stats, evaluate.route_counts(model, sample))
    on_train = evaluate.placement_shares(train_stats, train_stats)
    E, L = train_stats.num_experts, len(train_stats.layers)
    assert [(r.strategy, r.with_stats) for r in judged] == list(evaluate.PLACEMENTS)
    for r in judged + on_train:
        assert r.fast_tier.startswith("cuda:") and r.fast.shape == (L, E)
        assert int(r.fast.sum()) == sum(r.fast_per_layer) == L * E // 4, r
        assert all(0.0 <= x <= 1.0 for x in r.per_layer) and 0.0 <= r.overall <= 1.0, r
        # Every token makes k choices in every layer, so the overall share is the layers' mean.
        assert r.overall == pytest.approx(sum(r.per_layer) / L)
    for a, b in zip(judged, on_train):  # a plan depends on its statistics only, not on the text judging it
        assert torch.equal(a.fast, b.fast)

    by = {(r.strategy, r.with_stats): r for r in on_train}
    # uniform (builtin_strategies): the same number per layer; with statistics each layer's hottest (ties
    # by id, PlacementProblem.ranked), without them spread over the ids (spread_order's first quarter).
    spread = set(spread_order(E)[:E // 4])
    for row, layer in enumerate(train_stats.layers):
        c = train_stats.row(layer)
        busiest = sorted(range(E), key=lambda e: (-int(c[e]), e))[:E // 4]
        assert set(by["uniform", True].fast[row].nonzero().flatten().tolist()) == set(busiest)
        assert set(by["uniform", False].fast[row].nonzero().flatten().tolist()) == spread
    assert by["uniform", True].per_layer == pytest.approx(evaluate.hot_share(train_stats, train_stats))
    # frequency-per-layer takes the experts with the largest within-layer shares over all layers: on its own
    # statistics no choice of as many experts (uniform's included) serves a larger sum of per-layer shares.
    assert sum(by["frequency-per-layer", True].per_layer) >= sum(by["uniform", True].per_layer) - 1e-12
    assert by["uniform", True].overall > by["uniform", False].overall  # the statistics matter on this model


def test_placement_cli_prints_each_strategy_and_refuses_a_bad_inventory(tmp_path):
    cmd = [sys.executable, "-m", "moetier.model_zoo.default_model.evaluate", "--placement", "--windows", "1",
           "--train-windows", "1", "--threads", "1"]
    run = subprocess.run(cmd + ["--inventory", str(INVENTORIES / "xeon_amx_2socket_rtx4090.json")], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "fast tier cuda:0: 32 of 128 experts" in run.stdout
    for strategy, with_stats in evaluate.PLACEMENTS:
        assert f"| {strategy} | {'training text' if with_stats else 'none'} |" in run.stdout
    bad = subprocess.run(cmd + ["--inventory", str(tmp_path / "missing.json")], cwd=tmp_path, capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and "cannot read hardware inventory" in bad.stderr and "Traceback" not in bad.stderr
