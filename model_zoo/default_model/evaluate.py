"""Evaluate the default model: held-out perplexity per weight format, router choices and their skew, generation.

    python -m moetier.model_zoo.default_model.evaluate                  # the shipped checkpoint, whole held-out split
    python -m moetier.model_zoo.default_model.evaluate --windows 8      # a quick sample
    python -m moetier.model_zoo.default_model.evaluate --placement      # routing only: skew, placement shares

Perplexity takes a *model factory*: a function from a weight-format name to a callable mapping token ids
[B, T] to logits [B, T, V]. `transformers_factory` builds transformers' own Qwen3-MoE model in fp32 with
every routed expert's matrices round-tripped through moetier's reference `quantize` / `dequantize`;
another runtime is evaluated by passing its own factory instead, with nothing else changed.
Attention, norms, routers and embeddings stay as shipped (bf16 values); only routed experts change format,
as in moetier's placement.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moetier.errors import SettingError, ShapeError
from moetier.formats import dequantize, quantize
from moetier.placement import ActivationStats

from . import checkpoint_dir, corpus
from .train import spaced, windows

FORMATS = ("bf16", "fp8_e4m3", "int8", "int4_g32", "int4_g64", "int4_g128")
SEQ_LEN = 512

Logits = Callable[[torch.Tensor], torch.Tensor]
ModelFactory = Callable[[str], Logits]


def load_model(checkpoint: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """transformers' Qwen3MoeForCausalLM over the checkpoint (default: the shipped one), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint or checkpoint_dir()), dtype=dtype)
    return model.eval()


def load_tokenizer(checkpoint: str | Path | None = None):
    from .tokenizer import load_tokenizer as load

    return load(checkpoint or checkpoint_dir())


def _experts_modules(model) -> list[torch.nn.Module]:
    """The routed-experts module of every MoE layer, in layer order (transformers' fused [E, ...] parameters)."""
    found = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    if not found:
        raise TypeError(f"{type(model).__name__} has no routed-experts modules with gate_up_proj / down_proj")
    return found


@torch.no_grad()
def round_trip_experts_(model, fmt: str):
    """Replace every routed expert's gate, up and down matrices by dequantize(quantize(W, fmt)), in place.
    Gate and up are quantized as the separate [I, H] matrices they are on disk (fp8's 128x128 blocks and
    int8's rows never straddle the two)."""
    for experts in _experts_modules(model):
        gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            for rows in (slice(0, inter), slice(inter, 2 * inter)):
                w = gate_up[e, rows]
                w.copy_(dequantize(quantize(w.float(), fmt), w.dtype))
            down[e].copy_(dequantize(quantize(down[e].float(), fmt), down.dtype))
    return model


def transformers_factory(checkpoint: str | Path | None = None) -> ModelFactory:
    """Formats -> transformers' fp32 model over the checkpoint with its routed experts round-tripped."""
    def make(fmt: str) -> Logits:
        model = round_trip_experts_(load_model(checkpoint, torch.float32), fmt)
        return lambda ids: model(input_ids=ids).logits
    return make


def corpus_windows(tokenizer, split: str, max_windows: int | None = None, seq_len: int = SEQ_LEN,
                   root: Path | None = None) -> torch.Tensor:
    """Token windows [N, seq_len] of a corpus split: its files in corpus order, each followed by end-of-text,
    cut into non-overlapping windows; `max_windows` evenly spaced ones when given. Another Python version
    adds or drops a few files: the windows shift a little, the split itself does not."""
    ids: list[int] = []
    for enc in tokenizer(list(corpus.texts(split, root)), verbose=False)["input_ids"]:  # files are longer than a
        ids.extend(enc)                                                                 # window: no warning
        ids.append(tokenizer.eos_token_id)
    return spaced(windows(torch.tensor(ids, dtype=torch.int64), seq_len), max_windows)


def heldout_windows(tokenizer, max_windows: int | None = None, seq_len: int = SEQ_LEN) -> torch.Tensor:
    return corpus_windows(tokenizer, "heldout", max_windows, seq_len)


@torch.no_grad()
def perplexity(model: Logits, rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over the windows (the first token of each window is context only)."""
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i:i + batch_size]
        logits = model(batch).float()
        total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def perplexity_table(factory: ModelFactory, rows: torch.Tensor, formats: Sequence[str] = FORMATS) -> dict[str, float]:
    """Perplexity of the factory's model in each format over the same windows."""
    return {fmt: perplexity(factory(fmt), rows) for fmt in formats}


@torch.no_grad()
def route_counts(model, rows: torch.Tensor, batch_size: int = 8, source: str = "") -> ActivationStats:
    """How often each router chose each expert over the windows, as moetier's `ActivationStats` (counts
    int64 [MoE layers, experts], keyed by decoder-layer index; each token adds top_k to its layer's row).

    Records the top-k indices transformers' own routers return: Qwen-style router modules (with `top_k`
    and `num_experts`, returning (logits, weights, indices)) under `...layers.{i}.`."""
    routers = []
    for name, module in model.named_modules():
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if found and all(hasattr(module, a) for a in ("top_k", "num_experts", "weight")):
            routers.append((int(found.group(1)), module))
    if not routers:
        raise TypeError(f"{type(model).__name__} has no top-k router modules under layers.N to count")
    stats = ActivationStats(tuple(i for i, _ in routers), routers[0][1].num_experts, source=source)

    def hook(layer: int):
        def record(module, args, output):
            stats.add(layer, output[2].reshape(-1, module.top_k))
        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in routers]
    try:
        for i in range(0, rows.shape[0], batch_size):
            model(input_ids=rows[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return stats


@dataclass(frozen=True)
class LayerSkew:
    """How unequal one MoE layer's expert loads are (layer: its decoder-layer index). top_quarter_share:
    share of routed token-slots served by the busiest 25% of experts (0.25 when uniform);
    max_over_mean / min_over_mean: busiest and idlest expert against the mean load; idle: experts never chosen."""

    layer: int
    top_quarter_share: float
    max_over_mean: float
    min_over_mean: float
    idle: int


def skew(stats: ActivationStats) -> list[LayerSkew]:
    out = []
    for layer, row in zip(stats.layers, stats.counts.double()):
        ordered = row.sort(descending=True).values
        quarter = max(1, math.ceil(row.numel() / 4))
        mean = row.mean().item()
        out.append(LayerSkew(layer, ordered[:quarter].sum().item() / row.sum().item(), ordered[0].item() / mean,
                             ordered[-1].item() / mean, int((row == 0).sum())))
    return out


def served_share(judged_on: ActivationStats, fast: torch.Tensor) -> list[float]:
    """Per layer: the share of `judged_on`'s routed token-slots whose expert is marked in `fast` (bool
    [layers, experts], the experts a placement holds in the fast tier)."""
    if fast.shape != judged_on.counts.shape:
        raise ShapeError(f"fast-tier mask {list(fast.shape)} does not match the statistics' "
                         f"{list(judged_on.counts.shape)} (layers x experts)")
    served = (judged_on.counts * fast.to(judged_on.counts.dtype)).sum(1).double()
    return (served / judged_on.counts.sum(1).double()).tolist()


def hot_share(chosen_from: ActivationStats, judged_on: ActivationStats, fraction: float = 0.25) -> list[float]:
    """Per layer: the share of `judged_on`'s routed token-slots that the busiest `fraction` of experts by
    `chosen_from`'s counts serve (what a per-layer frequency placement with that fraction in the fast tier
    would serve, when its statistics come from other text)."""
    judged_on.check_layout(chosen_from.layers, chosen_from.num_experts, "the statistics judged")
    n = max(1, math.ceil(chosen_from.num_experts * fraction))
    hot = torch.zeros_like(chosen_from.counts, dtype=torch.bool)
    hot.scatter_(1, chosen_from.counts.topk(n, dim=1).indices, True)
    return served_share(judged_on, hot)


# ---- placement plans judged on other text ------------------------------------------------------------------

# (strategy, planned with the statistics): `uniform` without statistics spreads each layer's fast-tier
# experts over the ids, the baseline that serves about `fraction` of the work; with them it takes each
# layer's busiest.
PLACEMENTS = (("uniform", False), ("uniform", True), ("frequency", True), ("frequency-per-layer", True),
              ("cost", True))


@dataclass(frozen=True)
class PlacementShare:
    """One strategy's plan: `fast` (bool [layers, experts]) the experts it put on the fast tier, and per
    layer and over all layers the share of the judged routed token-slots those experts serve."""

    strategy: str
    with_stats: bool
    fast_tier: str
    fast: torch.Tensor
    per_layer: tuple[float, ...]
    overall: float

    @property
    def fast_per_layer(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.fast.sum(1))


def placement_shares(plan_stats: ActivationStats, judged_on: ActivationStats, checkpoint: str | Path | None = None,
                     *, placements: Sequence[tuple[str, bool]] = PLACEMENTS, fraction: float = 0.25, inventory=None,
                     cpu_mem: int = 2**30) -> list[PlacementShare]:
    """Make each (strategy, with statistics) placement's two-tier plan of the checkpoint, with `plan_stats`
    or none, as moetier's planner does for `moetier plan [--stats ...] --strategy S --gpu-mem ... --cpu-mem ...`,
    and judge it on `judged_on`.

    The fast tier is the planner's accelerator tier, sized in bytes to hold exactly `fraction` of all
    experts after what the planner reserves there (dense parts, KV cache, activations, device runtime);
    the rest goes to CPU DRAM (`cpu_mem`, ample for this model). Nothing is computed, so the inventory only
    names the machine: None reads the one `moetier` would use (detected, or MOETIER_INVENTORY); without an
    accelerator the planner plans for one (RTX 4090-class speeds), and CPU speeds, which the `cost`
    strategy reads, are the planner's assumptions for that inventory (no measurement, so plans are
    reproducible). SettingError when the plan would not hold exactly that many experts there."""
    from moetier.hardware import load_inventory
    from moetier.placement.budgets import make_budgets
    from moetier.placement.models import resolve_model
    from moetier.placement.planner import make_plan, tier_compute
    from moetier.placement.speeds import make_speeds
    from moetier.plugins import get_registry
    from moetier.selection import select_backends

    registry = get_registry()
    inventory = inventory if inventory is not None else load_inventory()
    info = resolve_model(str(checkpoint or checkpoint_dir()), registry)
    layout, parts = info.layout, info.parts
    judged_on.check_layout(plan_stats.layers, plan_stats.num_experts, "the statistics judged")
    cpu_backend = select_backends(registry, inventory).for_device("cpu")
    if cpu_backend is None:
        raise SettingError("no CPU backend can run on this inventory (see `moetier doctor`)")
    accel = {}
    for spec in sorted(registry.backends.values(), key=lambda s: s.name):
        if spec.device != "cpu":
            accel.setdefault(spec.device, spec.name)

    def budgets_for(gpu_mem: int):
        b = make_budgets(parts, inventory, registry.tiers.values(), gpu_mem=gpu_mem, cpu_mem=cpu_mem, context=SEQ_LEN)
        fast = b.of_kind("accelerator")
        if len(fast) != 1:
            raise SettingError(f"the inventory gives {len(fast)} accelerator tiers; one fast tier is needed "
                               "(give an inventory with one accelerator, or none)")
        return b, fast[0]

    probe, fast = budgets_for(1)
    compute = tier_compute(layout, probe, cpu_backend=cpu_backend, cpu_formats=registry.backend(cpu_backend).formats,
                           cpu_mixed=registry.backend(cpu_backend).mixed_formats,
                           accelerator_backends=accel)
    sizes = {m.experts.expert_bytes(compute[fast.name].fmt) for m in layout.moe_layers}
    if len(sizes) != 1:
        raise SettingError("experts of different sizes: a byte budget cannot hold an exact share of them")
    total = sum(m.experts.num_experts for m in layout.moe_layers)
    want = round(total * fraction)
    budgets, fast = budgets_for(fast.reserved_bytes + want * sizes.pop())
    speeds = make_speeds(budgets, inventory, measure=False, cpu_backend=cpu_backend)
    out = []
    for name, with_stats in placements:
        plan = make_plan(layout, parts, budgets, registry.placement(name), compute,
                         stats=plan_stats if with_stats else None, speeds=speeds)
        mask = torch.zeros_like(judged_on.counts, dtype=torch.bool)
        for row, layer in enumerate(judged_on.layers):
            for shard in plan.shards(layer):
                if shard.tier == fast.name:
                    mask[row, list(shard.experts)] = True
        if int(mask.sum()) != want:
            raise SettingError(f"strategy {name!r} put {int(mask.sum())} experts on {fast.name}, not {want} "
                               f"({fraction:.0%} of {total})")
        per_layer = served_share(judged_on, mask)
        overall = float((judged_on.counts * mask).sum()) / judged_on.total
        out.append(PlacementShare(name, with_stats, fast.name, mask, tuple(per_layer), overall))
    return out


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of the prompt (the new text only)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:])


def print_routing(model, tok, rows: torch.Tensor, train_windows: int | None = None, placement: bool = False,
                  inventory=None) -> None:
    """The skew table (held-out `rows`), and with `placement` the share each placement serves from a fast
    tier with a quarter of the experts, planned on training-text statistics and judged on `rows`."""
    counts = route_counts(model, rows, source="held-out split")
    train_rows = corpus_windows(tok, "train", train_windows or rows.shape[0])
    train_counts = route_counts(model, train_rows, source="training split")
    print(f"training text for the plans' statistics: {train_rows.shape[0]} windows x {train_rows.shape[1]} tokens")
    print("\n| layer | top-25% experts' share | max/mean | min/mean | idle experts | top 25% by training-text counts |"
          "\n|---|---|---|---|---|---|")
    for s, share in zip(skew(counts), hot_share(train_counts, counts)):
        print(f"| {s.layer} | {s.top_quarter_share:.3f} | {s.max_over_mean:.2f} | {s.min_over_mean:.2f} | {s.idle} "
              f"| {share:.3f} |")
    if not placement:
        return
    shares = placement_shares(train_counts, counts, inventory=inventory)
    layers = " | ".join(f"layer {i}" for i in counts.layers)
    print(f"\nfast tier {shares[0].fast_tier}: {int(shares[0].fast.sum())} of {counts.counts.numel()} experts"
          f"\n\n| strategy | statistics | fast-tier experts per layer | held-out share served | {layers} |"
          f"\n|---|---|---|---|{'---|' * len(counts.layers)}")
    for r in shares:
        print(f"| {r.strategy} | {'training text' if r.with_stats else 'none'} "
              f"| {' / '.join(map(str, r.fast_per_layer))} | {r.overall:.3f} | "
              + " | ".join(f"{x:.3f}" for x in r.per_layer) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moetier.model_zoo.default_model.evaluate",
                                description="Held-out perplexity per weight format, routing skew and a greedy sample.")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the shipped default model)")
    p.add_argument("--windows", type=int, help=f"held-out windows of {SEQ_LEN} tokens (default: all)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS, metavar="FMT")
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--placement", action="store_true",
                   help="only routing: the skew table and the held-out share each placement strategy serves from a "
                        "fast tier with 25%% of the experts, planned on training-text statistics")
    p.add_argument("--train-windows", type=int,
                   help="training-text windows for the statistics (default: as many as the held-out windows)")
    p.add_argument("--inventory", metavar="FILE.json",
                   help="a recorded hardware inventory to plan for (default: this machine's)")
    args = p.parse_args(argv)
    for flag, value in (("--windows", args.windows), ("--train-windows", args.train_windows),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    torch.set_num_threads(args.threads)
    if args.placement:
        from moetier.errors import MoetierError
        from moetier.hardware import load_inventory

        try:
            inventory = load_inventory(args.inventory) if args.inventory else None
            tok = load_tokenizer(args.checkpoint)
            rows = heldout_windows(tok, args.windows)
            print(f"held-out: {rows.shape[0]} windows x {rows.shape[1]} tokens = {rows.numel()} tokens")
            print_routing(load_model(args.checkpoint), tok, rows, args.train_windows, placement=True,
                          inventory=inventory)
        except MoetierError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    tok = load_tokenizer(args.checkpoint)
    rows = heldout_windows(tok, args.windows)
    print(f"held-out: {rows.shape[0]} windows x {rows.shape[1]} tokens = {rows.numel()} tokens")

    ppl = perplexity_table(transformers_factory(args.checkpoint), rows, args.formats)
    base = ppl.get("bf16")
    print("\n| format | perplexity | vs bf16 |\n|---|---|---|")
    for fmt, v in ppl.items():
        print(f"| {fmt} | {v:.4f} | {'' if base is None else f'{v / base:.4f}'} |")

    model = load_model(args.checkpoint)
    print_routing(model, tok, rows, args.train_windows)
    print(f"\ngreedy from {args.prompt!r}:\n{args.prompt}{generate(model, tok, args.prompt)}")
    log = Path(args.checkpoint or checkpoint_dir()) / "train_log.json"
    if log.is_file():
        print("\n| step | tokens | train loss | held-out loss | minutes |\n|---|---|---|---|---|")
        for p in json.loads(log.read_text(encoding="utf-8"))["curve"]:
            if p["heldout_loss"] is not None:
                print(f"| {p['step']} | {p['tokens']:,} | {p['train_loss']:.3f} | {p['heldout_loss']:.3f} "
                      f"| {p['elapsed_s'] / 60:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
