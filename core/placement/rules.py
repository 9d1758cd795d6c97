"""Explicit placement rules, as llama.cpp's --override-tensor: `PATTERN=TIER`, first matching rule wins.

PATTERN is either
- `layers.A-B.experts.C-D`: MoE layers A..B and expert ids C..D, inclusive; each side takes single
  numbers, ranges and `*`, comma-separated (`layers.3-10,20.experts.*`); or
- a regular expression searched in the routed experts' tensor (module) names as the checkpoint names
  them, e.g. `model\\.layers\\.(3|4)\\.mlp\\.experts\\.` (a fused checkpoint has one tensor for all of a
  layer's experts, so a regex there takes the whole layer). moetier places whole experts: a regex that
  matches some but not all of an expert's projections is an error.

TIER is a tier name (`cuda:0`, `cpu:numa1`, `disk`) or a kind: `gpu` / `accelerator`, `cpu`, `disk` (the
tiers of that kind, balanced). A rule that does not parse, names no tier here, or matches no expert (not
already claimed by an earlier rule) is an error naming the rule.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingError
from ..layout import MoELayout

_LAYERS_FORM = re.compile(r"^layers\.([^.]+)\.experts\.([^.]+)$")
KIND_ALIASES = {"gpu": "accelerator", "accelerator": "accelerator", "cpu": "cpu", "disk": "disk"}


@dataclass(frozen=True)
class Rule:
    text: str
    target: str  # a tier name or a kind
    layers: tuple[tuple[int, int], ...] | None = None  # inclusive ranges; None with `regex`
    experts: tuple[tuple[int, int], ...] | None = None
    regex: re.Pattern | None = None


def _ranges(text: str, rule: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.replace(" ", "").split(","):
        if part == "*":
            out.append((0, 1 << 62))
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise SettingError(f"placement rule {rule!r} does not parse: {part!r} is not a number, a range A-B or *")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise SettingError(f"placement rule {rule!r}: range {part} runs backwards")
        out.append((a, b))
    return tuple(out)


def parse_rule(text: str, tiers: Sequence[str]) -> Rule:
    """One `PATTERN=TIER` rule; SettingError naming it when it does not parse or names no tier here."""
    if "=" not in text:
        raise SettingError(f"placement rule {text!r} does not parse: expected PATTERN=TIER, e.g. "
                           "layers.3-10.experts.0-31=gpu")
    pattern, target = (s.strip() for s in text.rsplit("=", 1))
    if not pattern or not target:
        raise SettingError(f"placement rule {text!r} does not parse: empty pattern or tier")
    kind = KIND_ALIASES.get(target.lower())
    if kind is None and target not in tiers:
        raise SettingError(f"placement rule {text!r} names tier {target!r}, which is not here; tiers: "
                           f"{', '.join(tiers)} (or gpu, cpu, disk)")
    m = _LAYERS_FORM.match(pattern)
    if m is not None:
        return Rule(text, kind or target, _ranges(m.group(1), text), _ranges(m.group(2), text))
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SettingError(f"placement rule {text!r}: {pattern!r} is not a valid regular expression ({exc})") from None
    return Rule(text, kind or target, regex=regex)


def read_rules(path: str | Path) -> list[str]:
    """Rules from a file, one per line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise SettingError(f"--rules {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(f"--rules {path}: cannot read it ({exc})") from None
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def _within(x: int, ranges) -> bool:
    return any(a <= x <= b for a, b in ranges)


def expert_tensor_names(layout: MoELayout, layer: int, expert: int) -> tuple[str, ...]:
    names = layout.layer(layer).names
    if names.fused:
        return names.fused_names(layer)
    return tuple(names.expert_module(layer, expert, w) for w in ("gate", "up", "down"))


def resolve_rules(rules: Iterable[str], layout: MoELayout, tiers: Sequence[str]) -> dict[tuple[int, int], str]:
    """(layer, expert) -> tier or kind, for every expert a rule claims (first matching rule wins)."""
    parsed = [parse_rule(r, tiers) for r in rules]
    claimed: dict[tuple[int, int], str] = {}
    for rule in parsed:
        hits = 0
        for m in layout.moe_layers:
            if rule.layers is not None and not _within(m.index, rule.layers):
                continue
            for e in range(m.experts.num_experts):
                if (m.index, e) in claimed:
                    continue
                if rule.regex is None:
                    if not _within(e, rule.experts):
                        continue
                else:
                    names = expert_tensor_names(layout, m.index, e)
                    matched = [n for n in names if rule.regex.search(n)]
                    if not matched:
                        continue
                    if len(matched) != len(names):
                        missing = sorted(set(names) - set(matched))
                        raise SettingError(f"placement rule {rule.text!r} matches {matched[0]} but not {missing[0]}: "
                                           "moetier places whole experts; match all of an expert's projections")
                claimed[(m.index, e)] = rule.target
                hits += 1
        if hits == 0:
            raise SettingError(f"placement rule {rule.text!r} matches no routed expert of {layout.version} "
                               f"(MoE layers {layout.moe_layer_indices[0]}-{layout.moe_layer_indices[-1]}, "
                               f"{layout.moe_layers[0].experts.num_experts} experts each"
                               + (", or every match was claimed by an earlier rule)" if claimed else ")"))
    return claimed
