"""Activation statistics: how often each expert of each MoE layer was chosen.

`ActivationStats` is a [layers, experts] count (int64) over the model's MoE layers in layer order, plus
the number of tokens seen. The runtime's recorder calls `add(layer_index, topk_ids)` on the router
output of every forward (one bincount per call, no Python loop over tokens, so it can stay on while
serving). Saved as safetensors (the counts) with JSON metadata in the header; merged by adding; and
SGLang's expert-distribution dumps (`.pt` files holding `logical_count` [buffer, layers, experts], or a
dict with that key; the buffer dimension is summed) import directly.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SettingError, ShapeError

STATS_SCHEMA = "moetier.activation_stats"
STATS_SCHEMA_VERSION = 1


@dataclass(eq=False)
class ActivationStats:
    """counts[i, e]: times expert e of the i-th MoE layer (decoder layer `layers[i]`) was routed to.
    tokens[i]: tokens that went through that layer (each adds top_k to its row's sum)."""

    layers: tuple[int, ...]
    num_experts: int
    counts: torch.Tensor = field(default=None)  # int64 [len(layers), num_experts]
    tokens: torch.Tensor = field(default=None)  # int64 [len(layers)]
    source: str = ""

    def __post_init__(self):
        self.layers = tuple(int(i) for i in self.layers)
        if len(set(self.layers)) != len(self.layers):
            raise ShapeError(f"activation statistics: layers repeat: {list(self.layers)}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ShapeError(f"activation statistics: num_experts must be a positive int, got {self.num_experts!r}")
        n = len(self.layers)
        if self.counts is None:
            self.counts = torch.zeros(n, self.num_experts, dtype=torch.int64)
        if self.tokens is None:
            self.tokens = torch.zeros(n, dtype=torch.int64)
        if tuple(self.counts.shape) != (n, self.num_experts):
            raise ShapeError(f"activation statistics: counts must be [{n}, {self.num_experts}], "
                             f"got {list(self.counts.shape)}")
        if tuple(self.tokens.shape) != (n,):
            raise ShapeError(f"activation statistics: tokens must be [{n}], got {list(self.tokens.shape)}")
        self.counts = self.counts.to(torch.int64).contiguous()
        self.tokens = self.tokens.to(torch.int64).contiguous()
        if (self.counts < 0).any() or (self.tokens < 0).any():
            raise ShapeError("activation statistics: counts must not be negative")
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._lock = threading.Lock()

    # ---- recording ------------------------------------------------------------------------------
    def add(self, layer_index: int, topk_ids: torch.Tensor) -> None:
        """Count one forward's routing of decoder layer `layer_index`: topk_ids [T, k] (any int dtype, on
        any device). One bincount; safe to call from several threads."""
        try:
            row = self._row[layer_index]
        except KeyError:
            raise ShapeError(f"layer {layer_index} is not an MoE layer of these statistics "
                             f"(layers {self.layers[0]}..{self.layers[-1]})") from None
        if topk_ids.ndim != 2:
            raise ShapeError(f"topk_ids must be [T, k], got {list(topk_ids.shape)}")
        flat = topk_ids.detach().reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_experts):
            raise ShapeError(f"topk_ids hold ids outside [0, {self.num_experts})")
        counts = torch.bincount(flat, minlength=self.num_experts).cpu()
        with self._lock:
            self.counts[row] += counts
            self.tokens[row] += topk_ids.shape[0]

    # ---- views --------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def row(self, layer_index: int) -> torch.Tensor:
        return self.counts[self._row[layer_index]]

    def probabilities(self) -> torch.Tensor:
        """float64 [layers, experts]: the chance that one token routes to each expert (rows sum to top_k);
        rows with no tokens are NaN."""
        t = self.tokens.to(torch.float64).unsqueeze(1)
        return torch.where(t > 0, self.counts.to(torch.float64) / t.clamp_min(1), torch.nan)

    def shares(self) -> torch.Tensor:
        """float64 [layers, experts]: each row's counts normalized to sum to 1 (rows of zeros stay 0)."""
        c = self.counts.to(torch.float64)
        return c / c.sum(dim=1, keepdim=True).clamp_min(1)

    def check_layout(self, layers: Sequence[int], num_experts: int, what: str = "the model") -> None:
        """Refuse statistics recorded on another model (other MoE layers or expert count)."""
        if tuple(layers) != self.layers or num_experts != self.num_experts:
            raise SettingError(f"activation statistics{f' from {self.source}' if self.source else ''} are for "
                               f"{len(self.layers)} MoE layers x {self.num_experts} experts (layers "
                               f"{_span(self.layers)}), but {what} has {len(layers)} MoE layers x {num_experts} "
                               f"experts (layers {_span(layers)})")

    # ---- combining ------------------------------------------------------------------------------
    def merge(self, other: ActivationStats) -> ActivationStats:
        """A new ActivationStats with both counts added (same layers and experts required)."""
        other.check_layout(self.layers, self.num_experts, "the statistics merged into")
        return ActivationStats(self.layers, self.num_experts, self.counts + other.counts, self.tokens + other.tokens,
                               source=" + ".join(s for s in (self.source, other.source) if s))

    # ---- files ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """safetensors with `counts` [layers, experts] and `tokens` [layers]; the header's metadata holds
        {"schema", "schema_version", "layers", "num_experts"} as JSON."""
        from safetensors.torch import save_file

        meta = {"schema": STATS_SCHEMA, "schema_version": str(STATS_SCHEMA_VERSION),
                "layers": json.dumps(list(self.layers)), "num_experts": str(self.num_experts)}
        save_file({"counts": self.counts, "tokens": self.tokens}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, layers: Sequence[int] | None = None, *, num_hidden_layers: int | None = None,
             top_k: int | None = None) -> ActivationStats:
        """Read moetier's safetensors file, or an SGLang expert-distribution `.pt` dump (see `from_sglang`;
        `layers`, `num_hidden_layers` and `top_k` say how to read its rows)."""
        p = Path(path)
        if not p.is_file():
            raise SettingError(f"activation statistics {path}: no such file")
        with open(p, "rb") as f:
            magic = f.read(8)
        if magic[:2] == b"PK" or p.suffix == ".pt":  # torch.save writes a zip archive
            return cls.from_sglang(p, layers, num_hidden_layers=num_hidden_layers, top_k=top_k)
        return cls._load_safetensors(p)

    @classmethod
    def _load_safetensors(cls, p: Path) -> ActivationStats:
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(p), framework="pt") as f:
                meta = f.metadata() or {}
                counts, tokens = f.get_tensor("counts"), f.get_tensor("tokens")
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise SettingError(f"activation statistics {p}: not a moetier statistics file ({type(exc).__name__}: "
                               f"{exc})") from None
        if meta.get("schema") != STATS_SCHEMA:
            raise SettingError(f"activation statistics {p}: not a moetier statistics file "
                               f"(schema {meta.get('schema')!r})")
        if meta.get("schema_version") != str(STATS_SCHEMA_VERSION):
            raise SettingError(f"activation statistics {p}: schema_version {meta.get('schema_version')!r} is not "
                               f"supported; this moetier reads version {STATS_SCHEMA_VERSION}")
        try:
            layers = json.loads(meta["layers"])
            return cls(tuple(layers), int(meta["num_experts"]), counts, tokens, source=p.name)
        except (KeyError, ValueError, ShapeError) as exc:
            raise SettingError(f"activation statistics {p}: malformed ({exc})") from None

    @classmethod
    def from_sglang(cls, path: str | os.PathLike, layers: Sequence[int] | None = None, *,
                    num_hidden_layers: int | None = None, top_k: int | None = None) -> ActivationStats:
        """An SGLang expert-distribution dump: a tensor `logical_count` [buffer, layers, experts] (or
        [layers, experts]), or a dict holding it under "logical_count". The buffer dimension (passes or
        steps) is summed. Its rows are either the MoE layers in order (`layers`, default 0..n-1) or every
        decoder layer (`num_hidden_layers` rows: SGLang counts dense layers too, with zeros), from which
        the MoE layers' rows are taken. Tokens per layer are not in the dump: they are the row sums /
        top_k when `top_k` is given, else the row sums (probabilities then sum to 1, not to top_k)."""
        p = Path(path)
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SettingError(f"activation statistics {p}: cannot read it as a torch file "
                               f"({type(exc).__name__}: {exc})") from None
        if isinstance(obj, dict):
            if "logical_count" not in obj:
                raise SettingError(f"activation statistics {p}: the dict has no 'logical_count' "
                                   f"(keys: {', '.join(map(str, obj))})")
            obj = obj["logical_count"]
        if not isinstance(obj, torch.Tensor) or obj.ndim not in (2, 3) or obj.is_floating_point() and \
                not torch.isfinite(obj).all():
            raise SettingError(f"activation statistics {p}: expected logical_count [buffer, layers, experts], got "
                               f"{type(obj).__name__} {list(getattr(obj, 'shape', []))}")
        counts = obj.sum(dim=0) if obj.ndim == 3 else obj
        counts = counts.to(torch.int64)
        n_layers, n_experts = counts.shape
        if layers is None:
            layers = tuple(range(n_layers))
        elif len(layers) != n_layers:
            if n_layers != num_hidden_layers:
                raise SettingError(f"activation statistics {p}: the dump has {n_layers} layers but the model has "
                                   f"{len(layers)} MoE layers" + (f" and {num_hidden_layers} decoder layers"
                                                                  if num_hidden_layers else ""))
            counts = counts[list(layers)]
        per_token = top_k or 1
        return cls(tuple(layers), int(n_experts), counts, counts.sum(dim=1) // per_token, source=p.name)


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers else "none"
