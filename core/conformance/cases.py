"""The conformance cases: generic over any ExpertBackend, each compared with the float64 oracle.

Inputs are drawn on the CPU (so a seed reproduces a run on any machine), moved to the backend's device
for the call, and the output is brought back and compared on the CPU with the oracle's."""
from __future__ import annotations

import math

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import DeviceError, DTypeError, ExpertIdError, FormatError, MoetierError, NonFiniteError, ShapeError
from ..experts import ExpertBackend, ExpertLayerSpec, ExpertTensors, ExpertWeights, PreparedExperts
from ..formats import FORMATS, get_format, quantize
from .tolerances import tolerance


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int


# Tiny, odd (not multiples of 8/16/32), partial 128-blocks, and real family shapes scaled down.
SHAPES = (
    Shape("tiny", 4, 2, 16, 8),
    Shape("odd", 5, 3, 50, 37),
    Shape("partial-blocks", 6, 2, 130, 200),
    Shape("qwen3-30b/8", 16, 8, 256, 96),
    Shape("deepseek-v3/16", 32, 8, 448, 128),
    Shape("qwen3-next/16", 48, 10, 128, 32),
)
TOKEN_COUNTS = (0, 1, 3, 130)


def whole_blocks(fmt: str, n: int) -> int:
    """n rounded up to whole blocks of `fmt` (GGUF, mxfp4: 32 or 256 inputs per row; mixed: both parts')."""
    m = math.lcm(*(p.block_size or 1 for p in get_format(fmt).parts))
    return -(-n // m) * m


def shapes_for(fmt: str, shapes: tuple[Shape, ...] = SHAPES) -> tuple[Shape, ...]:
    """`shapes` as a format can store them: block formats hold whole blocks per row, so hidden and
    intermediate sizes are rounded up to the block (same experts, same k)."""
    return tuple(Shape(s.name, s.num_experts, s.top_k, whole_blocks(fmt, s.hidden), whole_blocks(fmt, s.intermediate))
                 for s in shapes)
TOPK_SWEEP = (1, 2, 3, 4, 5, 6, 7, 8, 10)


class CaseFailure(AssertionError):
    """A conformance case did not hold."""


@dataclass
class Context:
    """Per-run caches: weights per (shape, fmt), prepared experts per (backend, shape, fmt, subset)."""

    backend: ExpertBackend
    oracle: ExpertBackend
    seed: int
    _weights: dict = field(default_factory=dict)
    _prepared: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def generator(self, *key) -> torch.Generator:
        g = torch.Generator()
        # crc32 of the key, not hash(): str hashes change per process and the seed must reproduce a run.
        g.manual_seed(zlib.crc32(repr((self.seed,) + key).encode()) + (self.seed << 32))
        return g

    def layer(self, shape: Shape, activation: str = "silu") -> ExpertLayerSpec:
        if activation == "silu":
            return ExpertLayerSpec(shape.num_experts, shape.top_k, shape.hidden, shape.intermediate)
        # Biased layers; swiglu_oai with a low limit so that both clamps really cut values.
        return ExpertLayerSpec(shape.num_experts, shape.top_k, shape.hidden, shape.intermediate,
                               activation=activation.removesuffix("+bias"), swiglu_limit=0.75, has_bias=True)

    def weights(self, shape: Shape, fmt: str, activation: str = "silu") -> ExpertWeights:
        key = (shape, fmt, activation)
        if key not in self._weights:
            g = self.generator("weights", shape.name, fmt, activation)
            E, H, I = shape.num_experts, shape.hidden, shape.intermediate
            gate = torch.randn(E, I, H, generator=g) / H ** 0.5
            up = torch.randn(E, I, H, generator=g) / H ** 0.5
            down = torch.randn(E, H, I, generator=g) / I ** 0.5
            biases = None
            if activation != "silu":
                biases = (torch.randn(E, I, generator=g), torch.randn(E, I, generator=g), torch.randn(E, H, generator=g))
            self._weights[key] = ExpertWeights.from_float(gate, up, down, fmt, biases=biases)
        return self._weights[key]

    def prepared(self, which: str, shape: Shape, fmt: str, held: tuple[int, ...],
                 activation: str = "silu") -> PreparedExperts:
        key = (which, shape, fmt, held, activation)
        with self._lock:
            if key not in self._prepared:
                b = self.backend if which == "backend" else self.oracle
                self._prepared[key] = b.prepare(self.layer(shape, activation), self.weights(shape, fmt, activation),
                                                held, fmt)
            return self._prepared[key]


def random_routing(g: torch.Generator, T: int, E: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-k ids per token and positive weights that sum to one, as a router produces."""
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.int64)
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return ids.to(torch.int64).contiguous(), w.contiguous()


def to_device(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


def on_host(out: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The backend's output brought to the CPU, after checking it came back on the backend's device."""
    if not isinstance(out, torch.Tensor):
        raise CaseFailure(f"backend returned {type(out).__name__}, not a tensor")
    if out.device.type != device.type or (device.index is not None and out.device.index != device.index):
        raise CaseFailure(f"output is on {out.device}, expected the backend's device {device}")
    return out.cpu()


def check_close(out: torch.Tensor, ref: torch.Tensor, fmt: str, out_dtype: torch.dtype = torch.float32) -> float:
    if tuple(out.shape) != tuple(ref.shape):
        raise CaseFailure(f"output shape {list(out.shape)}, expected {list(ref.shape)}")
    if out.dtype != out_dtype:
        raise CaseFailure(f"output dtype {out.dtype}, expected {out_dtype}")
    o = out.to(torch.float64)
    if not torch.isfinite(o).all():
        raise CaseFailure("output has NaN/Inf")
    ref_norm = float(ref.norm())
    if ref_norm == 0.0:
        if o.numel() and float(o.abs().max()) != 0.0:
            raise CaseFailure("expected an all-zero output (no held expert routed), got non-zeros")
        return 0.0
    rel = float((o - ref).norm()) / ref_norm
    tol = tolerance(fmt)
    if out_dtype == torch.bfloat16:
        tol = max(tol, 1e-2)  # bf16 output rounding alone is up to 2^-8 per element
    if not rel <= tol:
        raise CaseFailure(f"relative error {rel:.3g} exceeds the {fmt} bound {tol:g}")
    return rel


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    fmt: str
    run: Callable[[Context], float | None]  # returns the relative error when it compares numbers


# ---- case builders ---------------------------------------------------------------------------------

def _forward_case(shape: Shape, fmt: str, T: int, *, k: int | None = None, held: str = "all",
                  hidden_dtype=torch.float32, out_dtype=torch.float32, one_expert: bool = False,
                  mode: str = "forward", activation: str = "silu") -> Callable[[Context], float]:
    def run(ctx: Context) -> float:
        kk = k or shape.top_k
        E = shape.num_experts
        g = ctx.generator("inputs", shape.name, fmt, T, kk, held, str(hidden_dtype), str(out_dtype), one_expert, mode,
                          activation)
        if held == "all":
            held_ids = tuple(range(E))
        else:  # a random strict subset: the rest must contribute nothing
            held_ids = tuple(sorted(torch.randperm(E, generator=g)[: max(1, E // 2)].tolist()))
        hidden = torch.randn(T, shape.hidden, generator=g).to(hidden_dtype)
        if one_expert:
            ids = torch.full((T, 1), int(torch.randint(E, (1,), generator=g)), dtype=torch.int64)
            w = torch.rand(T, 1, generator=g) + 0.5
        else:
            ids, w = random_routing(g, T, E, kk)
        p = ctx.prepared("backend", shape, fmt, held_ids, activation)
        ref = ctx.oracle.forward(ctx.prepared("oracle", shape, fmt, held_ids, activation), hidden, ids, w,
                                 out_dtype=torch.float32)
        ref = ref.to(torch.float64)
        dev = ctx.backend.device
        if mode == "threads":
            return _two_threads(ctx, p, shape, fmt, hidden, ids, w, ref, out_dtype)
        d_hidden, d_ids, d_w = to_device(dev, hidden, ids, w)
        if mode == "submit":
            out = ctx.backend.submit(p, d_hidden, d_ids, d_w, out_dtype=out_dtype).wait(timeout=600)
        else:
            out = ctx.backend.forward(p, d_hidden, d_ids, d_w, out_dtype=out_dtype)
        return check_close(on_host(out, dev), ref, fmt, out_dtype)
    return run


def _two_threads(ctx, p, shape, fmt, hidden, ids, w, ref, out_dtype) -> float:
    # Two threads call forward at once with different inputs; each must get its own correct answer.
    g = ctx.generator("thread2", shape.name, fmt)
    hidden2 = torch.randn(hidden.shape, generator=g)
    ids2, w2 = random_routing(g, hidden.shape[0], shape.num_experts, ids.shape[1])
    ref2 = ctx.oracle.forward(ctx.prepared("oracle", shape, fmt, p.expert_ids), hidden2, ids2, w2).to(torch.float64)
    results: dict[int, torch.Tensor | BaseException] = {}

    dev = ctx.backend.device

    def work(i, h, d, ww):
        try:
            h, d, ww = to_device(dev, h, d, ww)
            for _ in range(3):
                results[i] = on_host(ctx.backend.forward(p, h, d, ww, out_dtype=out_dtype), dev)
        except BaseException as exc:  # surfaced below
            results[i] = exc

    threads = [threading.Thread(target=work, args=(0, hidden, ids, w)),
               threading.Thread(target=work, args=(1, hidden2, ids2, w2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for i in (0, 1):
        if isinstance(results.get(i), BaseException):
            raise CaseFailure(f"thread {i} raised {type(results[i]).__name__}: {results[i]}")
        if i not in results:
            raise CaseFailure(f"thread {i} did not finish")
    return max(check_close(results[0], ref, fmt, out_dtype), check_close(results[1], ref2, fmt, out_dtype))


def _error_case(shape: Shape, fmt: str, what: str) -> Callable[[Context], None]:
    def expect(exc_type, fn, label):
        try:
            fn()
        except exc_type:
            return
        except MoetierError as exc:
            raise CaseFailure(f"{label}: raised {type(exc).__name__} ({exc}), expected {exc_type.__name__}") from None
        except Exception as exc:
            raise CaseFailure(f"{label}: raised untyped {type(exc).__name__} ({exc}), expected {exc_type.__name__}") from None
        raise CaseFailure(f"{label}: no error raised, expected {exc_type.__name__}")

    def run(ctx: Context) -> None:
        E, H, k = shape.num_experts, shape.hidden, shape.top_k
        g = ctx.generator("errors", shape.name, fmt, what)
        p = ctx.prepared("backend", shape, fmt, tuple(range(E)))
        dev = ctx.backend.device
        hidden, = to_device(dev, torch.randn(4, H, generator=g))
        ids, w = to_device(dev, *random_routing(g, 4, E, k))
        b = ctx.backend

        def randn(*size):  # bad inputs are made on the backend's device: only the named fault differs
            return torch.randn(*size, generator=g).to(dev)
        if what == "hidden-shape":
            expect(ShapeError, lambda: b.forward(p, randn(4, H + 1), ids, w), "hidden [T, H+1]")
            expect(ShapeError, lambda: b.forward(p, randn(H), ids[:1], w[:1]), "1-D hidden")
        elif what == "ids-shape":
            expect(ShapeError, lambda: b.forward(p, hidden, ids[:3], w[:3]), "topk_ids with fewer rows")
            expect(ShapeError, lambda: b.forward(p, hidden, ids, w[:, :1].contiguous()), "topk_weights [T, 1] vs ids [T, k]")
        elif what == "dtype":
            expect(DTypeError, lambda: b.forward(p, hidden.to(torch.float64), ids, w), "float64 hidden")
            expect(DTypeError, lambda: b.forward(p, hidden, ids.to(torch.float32), w), "float ids")
            expect(DTypeError, lambda: b.forward(p, hidden, ids, w, out_dtype=torch.int32), "int32 out_dtype")
        elif what == "ids-range":
            bad = ids.clone()
            bad[2, 0] = E
            expect(ExpertIdError, lambda: b.forward(p, hidden, bad, w), f"expert id {E} with {E} experts")
            bad[2, 0] = -1
            expect(ExpertIdError, lambda: b.forward(p, hidden, bad, w), "expert id -1")
            expect(ExpertIdError, lambda: b.submit(p, hidden, bad, w), "expert id -1 through submit")
        elif what == "non-contiguous":
            wide = randn(H, 4).T  # [4, H] view with strides (1, 4)
            expect(ShapeError, lambda: b.forward(p, wide, ids, w), "non-contiguous hidden")
        elif what == "nan":
            bad_h = hidden.clone()
            bad_h[1, 0] = float("nan")
            if getattr(b, "nan_policy", "raise") == "raise":
                expect(NonFiniteError, lambda: b.forward(p, bad_h, ids, w), "NaN in hidden")
        elif what == "device":
            # Inputs on another device than the backend's: a CPU backend gets "meta" tensors (a device
            # every torch build has), an accelerator backend gets CPU tensors.
            other = torch.device("meta") if dev.type == "cpu" else torch.device("cpu")
            expect(DeviceError, lambda: b.forward(p, hidden.to(other), ids, w), f"hidden on {other}")
            expect(DeviceError, lambda: b.forward(p, hidden, ids.to(other), w), f"topk_ids on {other}")
            expect(DeviceError, lambda: b.submit(p, hidden, ids, w.to(other)), f"topk_weights on {other} through submit")
        elif what == "prepare-shape":
            layer = ctx.layer(shape)
            good = ctx.weights(shape, fmt).expert(0)
            wrong = ExpertTensors(quantize(torch.randn(shape.intermediate + 1, H, generator=g), get_format(fmt).gate_up),
                                  good.up, good.down)
            expect(ShapeError, lambda: b.prepare(layer, ExpertWeights({0: wrong}), [0], fmt), "gate [I+1, H] at prepare")
            expect(ExpertIdError, lambda: b.prepare(layer, ctx.weights(shape, fmt), [E], fmt), f"prepare expert {E}")
        elif what == "format":
            layer = ctx.layer(shape)
            expect(FormatError, lambda: b.prepare(layer, ctx.weights(shape, fmt), [0], "int3_g7"), "unknown format")
            undeclared = [f for f in FORMATS if f not in b.formats]
            if undeclared:
                expect(FormatError, lambda: b.prepare(layer, ctx.weights(shape, fmt), [0], undeclared[0]),
                       f"format {undeclared[0]} the backend does not declare")
            if not b.mixed_formats and len(b.formats) > 1:  # one format per layer: a mixed one is refused
                mixed = f"{b.formats[0]}+{b.formats[1]}"
                expect(FormatError, lambda: b.prepare(layer, ctx.weights(shape, fmt), [0], mixed),
                       f"mixed format {mixed} from a backend without mixed_formats")
        else:
            raise ValueError(what)
    return run


ERROR_KINDS = ("hidden-shape", "ids-shape", "dtype", "ids-range", "non-contiguous", "nan", "device", "prepare-shape",
               "format")

# Dense matrices (moetier.dense), for a CPU backend declaring dense_formats: (out, in) odd, with partial
# blocks and a bundle of one panel, and rows long enough for int8-activation decode; grouped ones
# (block-diagonal, `grouped_dense`) as 3 blocks of 32 rows.
DENSE_SHAPES = ((37, 50), (200, 130), (96, 256))
DENSE_TOKENS = (0, 1, 3, 130)


def _dense_case(fmt: str, N: int, K: int, T: int, *, bias: bool, x_dtype=torch.float32, out_dtype=torch.float32,
                groups: int = 1) -> Callable[[Context], float]:
    def run(ctx: Context) -> float:
        g = ctx.generator("dense", fmt, N, K, T, bias, str(x_dtype), str(out_dtype), groups)
        q = quantize(torch.randn(N, K, generator=g) / K ** 0.5, fmt)
        b = torch.randn(N, generator=g) if bias else None
        x = torch.randn(T, groups * K, generator=g).to(x_dtype)
        ref = ctx.oracle.compute_dense(ctx.oracle.pack_linear(q, b, groups=groups), x, torch.float64)
        packed = ctx.backend.pack_linear(q, b, groups=groups)
        if (packed.out_features, packed.in_features, packed.groups) != (N, groups * K, groups):
            raise CaseFailure(f"packed as [{packed.out_features}, {packed.in_features}] in {packed.groups} groups, "
                              f"expected [{N}, {groups * K}] in {groups}")
        return check_close(ctx.backend.linear(packed, x, out_dtype=out_dtype), ref, fmt, out_dtype)
    return run


def _dense_errors(fmt: str, K: int) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        packed = ctx.backend.pack_linear(quantize(torch.randn(16, K, generator=ctx.generator("dense-errors", fmt)), fmt))
        for label, exc_type, x in (("x of another width", ShapeError, torch.randn(2, K + 1)),
                                   ("x of one dimension", ShapeError, torch.randn(K)),
                                   ("float16 x", DTypeError, torch.randn(2, K).half())):
            try:
                ctx.backend.linear(packed, x)
            except exc_type:
                continue
            except Exception as exc:  # noqa: BLE001 - any other type is the failure being reported
                raise CaseFailure(f"{label}: raised {type(exc).__name__}, expected {exc_type.__name__}") from exc
            raise CaseFailure(f"{label}: accepted, expected {exc_type.__name__}")
    return run


def dense_cases(formats: tuple[str, ...], grouped: bool) -> list[Case]:
    """The dense-matrix cases for a CPU backend computing dense matrices in `formats`."""
    cases: list[Case] = []
    for fmt in formats:
        up = lambda n: whole_blocks(fmt, n)  # noqa: E731
        for N, K in DENSE_SHAPES:
            for T in DENSE_TOKENS:
                cases.append(Case(f"{fmt}/dense/{N}x{up(K)}/T{T}", "dense", fmt,
                                  _dense_case(fmt, N, up(K), T, bias=T % 2 == 1)))
        cases.append(Case(f"{fmt}/dense/bf16-in-out", "dense", fmt,
                          _dense_case(fmt, 96, up(256), 5, bias=True, x_dtype=torch.bfloat16, out_dtype=torch.bfloat16)))
        if grouped:
            for T in (1, 3):
                cases.append(Case(f"{fmt}/dense/grouped/T{T}", "dense", fmt,
                                  _dense_case(fmt, 96, up(64), T, bias=T == 3, groups=3)))
        cases.append(Case(f"{fmt}/dense/errors", "bad-input", fmt, _dense_errors(fmt, up(64))))
    return cases


def build_cases(formats: tuple[str, ...]) -> list[Case]:
    """Every case for a backend that declares `formats`."""
    cases: list[Case] = []
    for fmt in formats:
        shapes = shapes_for(fmt)
        for shape in shapes:
            for T in TOKEN_COUNTS:
                cases.append(Case(f"{fmt}/{shape.name}/T{T}", "shapes", fmt, _forward_case(shape, fmt, T)))
        sweep, = shapes_for(fmt, (Shape("topk-sweep", 12, 10, 64, 40),))
        for k in TOPK_SWEEP:
            cases.append(Case(f"{fmt}/topk{k}", "top-k", fmt, _forward_case(sweep, fmt, 17, k=k)))
        odd, qwen = shapes[1], shapes[3]
        cases += [
            Case(f"{fmt}/one-expert", "routing", fmt, _forward_case(qwen, fmt, 40, one_expert=True)),
            Case(f"{fmt}/subset/T1", "subset", fmt, _forward_case(qwen, fmt, 1, held="subset")),
            Case(f"{fmt}/subset/T130", "subset", fmt, _forward_case(qwen, fmt, 130, held="subset")),
            Case(f"{fmt}/subset-odd", "subset", fmt, _forward_case(odd, fmt, 9, held="subset")),
            Case(f"{fmt}/bf16-in", "dtypes", fmt, _forward_case(odd, fmt, 5, hidden_dtype=torch.bfloat16)),
            Case(f"{fmt}/bf16-out", "dtypes", fmt, _forward_case(qwen, fmt, 5, out_dtype=torch.bfloat16)),
            Case(f"{fmt}/bf16-in-out/T130", "dtypes", fmt,
                 _forward_case(qwen, fmt, 130, hidden_dtype=torch.bfloat16, out_dtype=torch.bfloat16)),
            Case(f"{fmt}/submit/T1", "async", fmt, _forward_case(qwen, fmt, 1, mode="submit")),
            Case(f"{fmt}/submit/T130", "async", fmt, _forward_case(qwen, fmt, 130, mode="submit")),
            Case(f"{fmt}/two-threads/T2", "concurrency", fmt, _forward_case(qwen, fmt, 2, mode="threads")),
            Case(f"{fmt}/two-threads/T64", "concurrency", fmt, _forward_case(qwen, fmt, 64, mode="threads")),
        ]
        for act in ("silu+bias", "swiglu_oai+bias"):
            for shape, T in ((odd, 3), (qwen, 130)):
                cases.append(Case(f"{fmt}/{act}/{shape.name}/T{T}", "activation", fmt,
                                  _forward_case(shape, fmt, T, activation=act)))
        for what in ERROR_KINDS:
            cases.append(Case(f"{fmt}/errors/{what}", "bad-input", fmt, _error_case(odd, fmt, what)))
    return cases
