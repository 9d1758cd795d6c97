"""A plan as a picture: MoE layers down, expert ids across, each cell coloured by its tier and, when
activation statistics are given, shaded by how often the expert was chosen (dark: rarely). matplotlib
is the optional extra `plot`."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import SettingError
from .plan import PlacementPlan

# tier kind -> RGB; tiers of one kind get lighter shades of its colour
_COLOURS = {"accelerator": (0.16, 0.63, 0.17), "cpu": (0.12, 0.47, 0.71), "disk": (0.84, 0.37, 0.0)}


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SettingError("--png needs matplotlib, the optional extra `plot`: pip install 'moetier[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _kind(plan: PlacementPlan, tier: str) -> str:
    for t in plan.tiers:
        if t.name == tier:
            return t.kind
    return "disk" if tier == "disk" else "cpu" if tier.startswith("cpu") else "accelerator"


def tier_matrix(plan: PlacementPlan) -> tuple[list[str], torch.Tensor]:
    """(tier names, int64 [MoE layers, max experts]): each cell the index of its expert's tier, -1 past a
    layer's last expert."""
    names = list(plan.tier_names)
    width = max(s.num_experts for s in plan.model.layers)
    m = torch.full((len(plan.model.layers), width), -1, dtype=torch.int64)
    for row, layer in enumerate(plan.moe_layers):
        for s in plan.shards(layer):
            m[row, list(s.experts)] = names.index(s.tier)
    return names, m


def save_png(plan: PlacementPlan, path: str | Path, stats=None) -> None:
    plt = require_matplotlib()
    names, m = tier_matrix(plan)
    colours = []
    seen: dict[str, int] = {}
    for n in names:
        k = _kind(plan, n)
        base = _COLOURS[k]
        j = seen.get(k, 0)
        seen[k] = j + 1
        colours.append(tuple(c + (1 - c) * 0.35 * j for c in base))
    rgb = torch.ones(*m.shape, 3)
    for i, c in enumerate(colours):
        rgb[m == i] = torch.tensor(c)
    if stats is not None:
        shares = stats.shares().to(torch.float32)
        rows = {layer: r for r, layer in enumerate(stats.layers)}
        for row, layer in enumerate(plan.moe_layers):
            if layer not in rows:
                continue
            s = shares[rows[layer]]
            n = s.numel()
            # log scale around the uniform share: 1/16 of it or less -> darkest, 4x or more -> full colour
            shade = ((torch.log2((s * n).clamp_min(1e-9)) + 4) / 6).clamp(0.15, 1.0)
            rgb[row, :n] *= shade.unsqueeze(1)
    n_layers, width = m.shape
    fig_w = min(16.0, max(6.0, width / 16))
    fig_h = min(12.0, max(3.0, n_layers / 6))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    ax.imshow(rgb.numpy(), aspect="auto", interpolation="nearest")
    step = max(1, math.ceil(n_layers / 16))
    ax.set_yticks(range(0, n_layers, step), [str(plan.moe_layers[r]) for r in range(0, n_layers, step)])
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    title = f"{plan.model.version}: {plan.strategy} placement"
    ax.set_title(title + (" (shade: activation share)" if stats is not None else ""))
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=c, label=f"{n} ({plan.expert_count(n):,})") for n, c in zip(names, colours)],
              loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(4, len(names)), frameon=False)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
