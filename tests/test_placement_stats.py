"""ActivationStats: recording, saving, merging, and SGLang's expert-distribution dumps."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from moetier.errors import SettingError, ShapeError
from moetier.placement import ActivationStats

LAYERS = (3, 4, 5, 6)
E = 32


def routing(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Distinct ids per token, skewed towards low ids."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, E, generator=g) + torch.linspace(1.0, 0.0, E)
    return scores.topk(k, dim=1).indices


def test_add_counts_what_the_router_chose():
    s = ActivationStats(LAYERS, E)
    want = torch.zeros(len(LAYERS), E, dtype=torch.int64)
    for step in range(5):
        for r, layer in enumerate(LAYERS):
            ids = routing(7 + step, 4, seed=step * 10 + r)
            s.add(layer, ids.to(torch.int32) if step % 2 else ids)
            for e in ids.reshape(-1).tolist():
                want[r, e] += 1
    assert torch.equal(s.counts, want)
    assert s.tokens.tolist() == [sum(7 + i for i in range(5))] * len(LAYERS)
    assert s.total == int(want.sum())
    p = s.probabilities()
    assert torch.allclose(p.sum(dim=1), torch.full((len(LAYERS),), 4.0, dtype=torch.float64))
    with pytest.raises(ShapeError, match="layer 2 is not an MoE layer of these statistics"):
        s.add(2, ids)
    with pytest.raises(ShapeError, match=r"ids outside \[0, 32\)"):
        s.add(3, torch.tensor([[0, 32]]))
    with pytest.raises(ShapeError, match=r"topk_ids must be \[T, k\]"):
        s.add(3, torch.tensor([1, 2]))


def test_save_load_and_merge(tmp_path):
    a, b = ActivationStats(LAYERS, E), ActivationStats(LAYERS, E)
    for r, layer in enumerate(LAYERS):
        a.add(layer, routing(11, 2, r))
        b.add(layer, routing(5, 2, 100 + r))
    path = tmp_path / "stats.safetensors"
    a.save(path)
    back = ActivationStats.load(path)
    assert back.layers == LAYERS and torch.equal(back.counts, a.counts) and torch.equal(back.tokens, a.tokens)
    m = a.merge(b)
    assert torch.equal(m.counts, a.counts + b.counts) and torch.equal(m.tokens, a.tokens + b.tokens)
    other = ActivationStats((3, 4, 5), E)
    with pytest.raises(SettingError, match="are for 3 MoE layers x 32 experts .* has 4 MoE layers x 32 experts"):
        a.merge(other)


def test_foreign_or_newer_files_are_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"counts": torch.zeros(2, 2, dtype=torch.int64), "tokens": torch.zeros(2, dtype=torch.int64)}, str(p),
              metadata={"schema": "moetier.activation_stats", "schema_version": "9", "layers": "[0, 1]",
                        "num_experts": "2"})
    with pytest.raises(SettingError, match="schema_version '9' is not supported"):
        ActivationStats.load(p)
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(SettingError, match="not a moetier statistics file"):
        ActivationStats.load(p)
    with pytest.raises(SettingError, match="no such file"):
        ActivationStats.load(tmp_path / "missing.safetensors")


def test_sglang_dump_imports(tmp_path):
    g = torch.Generator().manual_seed(0)
    logical = torch.randint(0, 50, (3, len(LAYERS), E), generator=g)  # [buffer, layers, experts]
    path = tmp_path / "expert_distribution_recorder.pt"
    torch.save({"logical_count": logical, "average_utilization_rate_over_window": 0.5}, path)
    s = ActivationStats.load(path, LAYERS, top_k=4)
    assert s.layers == LAYERS and torch.equal(s.counts, logical.sum(dim=0))
    assert s.tokens.tolist() == (logical.sum(dim=(0, 2)) // 4).tolist()
    # a bare tensor; rows for every decoder layer (SGLang counts dense layers too, with zeros)
    full = torch.zeros(2, 7, E, dtype=torch.int64)
    full[:, 3:] = logical[:2]
    torch.save(full, path)
    s = ActivationStats.from_sglang(path, LAYERS, num_hidden_layers=7, top_k=4)
    assert torch.equal(s.counts, logical[:2].sum(dim=0))
    with pytest.raises(SettingError, match="the dump has 7 layers but the model has 4 MoE layers and 9 decoder"):
        ActivationStats.from_sglang(path, LAYERS, num_hidden_layers=9)
    torch.save({"other": logical}, path)
    with pytest.raises(SettingError, match="has no 'logical_count'"):
        ActivationStats.load(path, LAYERS)
    torch.save(torch.zeros(4), path)
    with pytest.raises(SettingError, match=r"expected logical_count \[buffer, layers, experts\]"):
        ActivationStats.load(path, LAYERS)
