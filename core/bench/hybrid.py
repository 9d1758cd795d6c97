"""`moetier bench hybrid`: the hybrid step measured part by part.

For each shape (the Qwen3-30B-A3B layer, DeepSeek-V3 experts), each share of experts on the device (0,
25, 50, 75, 100%) and each batch (1, 8, 128, 512), the same fixed-batch hybrid step (HybridRunner,
captured in a CUDA graph unless --eager) is timed three ways, alternately: the CPU part alone (staging,
the two host functions, the CPU kernels, the copy back), the device part alone (the device experts),
and both together. Overlap efficiency = max(CPU part, device part) / joint time: 1.0 means the two
parts hide each other completely. The device part's expert bytes (each distinct device expert a step
touches, once) per second is given as a share of the device's memory bandwidth (nominal, from the
memory clock and bus width torch reports, else a measured device-to-device copy). Every configuration's
joint output is also checked against the standard tiered path (the same shards, summed in the same
order): `matches_standard_path`. Beside each measurement, what the placement cost model
(moetier.placement.cost) predicts for the same layer: each part's experts through `expert_time` with the
routing probabilities of the bench's own routings, the CPU's speeds measured now (the bench probes) and
the device's from the model's data-sheet table, the joint time the slower part plus the model's fixed
per-layer costs.

Before that, what one host function costs: an enqueue/sync pair of an empty task called directly
through ctypes and through a native host-function thread (both on the CPU), and on a device
cudaLaunchHostFunc itself (host launch cost, one host node, an enqueue/sync pair on a stream, and the
same pair replayed in a captured graph).

Weights are one random expert's bytes replicated over every expert id (timing only: each expert still
has its own packed copy, so the bytes streamed are real). With --cpu-stand-in the whole harness runs on
the CPU with cpu.accel as the "device": the numbers then measure nothing about a GPU, and say so.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..errors import BackendUnavailable, SettingError
from ..experts import ExpertBackend, ExpertLayerSpec, ExpertTensors, ExpertWeights
from ..runtime.hybrid import DeviceStreams, HybridStep, StagingRing, StandInStreams, host_task_backend
from ..runtime.tiered import Shard
from .measure import TimingPlan
from .workload import get_shape, random_hidden, random_matrix, random_routing, weights_seed

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
BATCHES = (1, 8, 128, 512)
SHAPES = ("deepseek-v3", "qwen3-30b")  # DeepSeek-V3 first: its batch-1 bandwidth share is a stated goal
GOAL_OVERLAP_B1 = 0.9
GOAL_DEVICE_BW_SHARE = 0.5
STAND_IN_NOTE = ("CPU stand-in: cpu.accel plays the GPU on this CPU. These numbers exercise the harness and "
                 "measure nothing about a GPU or about overlap on real hardware.")
# Steps chained between two synchronizations: the per-step time is what back-to-back steps (a decode
# step's layers) cost, not one step plus a host round trip.
CHAIN = {1: 8, 8: 8}
DECODE = TimingPlan(warmup=2, min_iters=5, max_iters=60, min_seconds=0.3, max_seconds=1.0)
PREFILL = TimingPlan(warmup=1, min_iters=3, max_iters=20, min_seconds=0.3, max_seconds=2.0)
QUICK = TimingPlan(warmup=1, min_iters=3, max_iters=10, min_seconds=0.05, max_seconds=0.2)
ROUNDS = 3  # the three measurements alternate this many times, so a noisy stretch hits all of them


@dataclass(frozen=True)
class HybridBenchConfig:
    cpu_backend: str
    device_backend: str
    stand_in: bool
    shapes: tuple[str, ...] = SHAPES
    shares: tuple[float, ...] = SHARES
    batches: tuple[int, ...] = BATCHES
    fmt: str = "bf16"
    graph: bool = True
    threads: int | None = None
    quick: bool = False
    time_budget_s: float = 300.0
    max_weight_bytes: int = 3 << 30
    seed: int = 0


@dataclass(frozen=True)
class HybridRow:
    """One (shape, share, batch): median seconds per step of each part and of the joint step."""

    shape: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    fmt: str
    share: float  # experts on the device / all experts
    batch: int
    graph: bool
    device_experts: int
    cpu_experts: int
    device_pair_share: float  # (token, expert) pairs the device experts serve, over all pairs
    cpu_s: float | None
    device_s: float | None
    joint_s: float
    device_expert_bytes: float  # mean distinct device expert bytes per step
    cpu_expert_bytes: float
    device_bandwidth: float | None  # bytes/s the share is taken of
    iterations: int
    matches_standard_path: bool
    predicted_cpu_s: float | None = None  # the placement cost model's times for the same layer
    predicted_device_s: float | None = None
    predicted_s: float | None = None

    @property
    def overlap(self) -> float | None:
        parts = [t for t in (self.cpu_s, self.device_s) if t is not None]
        if len(parts) < 2:
            return None
        return max(parts) / self.joint_s

    @property
    def device_gb_per_s(self) -> float | None:
        if not self.device_s or not self.device_expert_bytes:
            return None
        return self.device_expert_bytes / self.device_s / 1e9

    @property
    def device_bw_share(self) -> float | None:
        gbs = self.device_gb_per_s
        return None if gbs is None or not self.device_bandwidth else gbs * 1e9 / self.device_bandwidth

    @property
    def cpu_gb_per_s(self) -> float | None:
        if not self.cpu_s or not self.cpu_expert_bytes:
            return None
        return self.cpu_expert_bytes / self.cpu_s / 1e9

    def to_record(self) -> dict:
        d = asdict(self)
        d.update(overlap=self.overlap, device_gb_per_s=self.device_gb_per_s, device_bw_share=self.device_bw_share,
                 cpu_gb_per_s=self.cpu_gb_per_s)
        return d


# ---- what the machine has ------------------------------------------------------------------------------

def device_bandwidth(device: torch.device) -> dict:
    """Nominal memory bandwidth (2 x memory clock x bus width, as torch reports them) and a measured
    device-to-device copy (bytes read + written per second)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    nominal = 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None
    n = 1 << 28  # 1 GiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    measured = 2 * n * 4 / min(times)
    del src, dst
    torch.cuda.empty_cache()
    return {"nominal_bytes_per_s": nominal, "copy_bytes_per_s": measured,
            "used": "nominal" if nominal else "copy", "name": torch.cuda.get_device_name(device),
            "memory_clock_khz": clock_khz, "memory_bus_bits": bus_bits}


def _empty_task(cpu: ExpertBackend, hidden: int, k: int, fmt: str):
    """A host task over zero tokens: its runs do nothing, so timing it times the host functions."""
    layer = ExpertLayerSpec(1, 1, hidden, 16)
    g = torch.Generator().manual_seed(0)
    one = ExpertWeights({0: ExpertTensors(random_matrix(16, hidden, fmt, g), random_matrix(16, hidden, fmt, g),
                                          random_matrix(hidden, 16, fmt, g))})
    prepared = cpu.prepare(layer, one, [0], fmt)
    return cpu.host_task(prepared, torch.empty(0, hidden), torch.empty(0, k, dtype=torch.int64),
                         torch.empty(0, k), torch.empty(0, hidden)), prepared


def host_function_costs(cpu: ExpertBackend, streams, *, quick: bool) -> dict:
    """Microseconds per host function, or per enqueue/sync pair, of an empty task (see the module doc)."""
    n = 200 if quick else 2000
    task, keep = _empty_task(cpu, 64, 1, "bf16")
    out = {"iterations": n}
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    enqueue, sync = fn(task.enqueue.fn), fn(task.sync.fn)
    for _ in range(10):
        enqueue(task.enqueue.data)
        sync(task.sync.data)
    t0 = time.perf_counter()
    for _ in range(n):
        enqueue(task.enqueue.data)
        sync(task.sync.data)
    out["ctypes_pair_us"] = (time.perf_counter() - t0) / n * 1e6
    thread = cpu.host_callback_thread()
    t0 = time.perf_counter()
    last = 0
    for _ in range(n):
        thread.launch(task.enqueue.fn, task.enqueue.data)
        last = thread.launch(task.sync.fn, task.sync.data)
    thread.wait_executed(last)
    out["host_thread_pair_us"] = (time.perf_counter() - t0) / n * 1e6
    if isinstance(streams, DeviceStreams):
        out.update(_device_host_function_costs(streams, task, n))
    del keep
    return out


def _device_host_function_costs(streams: DeviceStreams, task, n: int) -> dict:
    dev, host = streams.device, streams.host
    s = torch.cuda.Stream(dev)
    out = {"launcher": f"{host.symbol} ({host.source})"}
    with torch.cuda.stream(s):
        for _ in range(10):
            host.launch(s.cuda_stream, task.sync)
        s.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            host.launch(s.cuda_stream, task.sync)  # the task is idle: this host function returns at once
        launched = time.perf_counter()
        s.synchronize()
        done = time.perf_counter()
        out["launch_us"] = (launched - t0) / n * 1e6
        out["stream_noop_us"] = (done - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n):
            host.launch(s.cuda_stream, task.enqueue)
            host.launch(s.cuda_stream, task.sync)
        s.synchronize()
        out["stream_pair_us"] = (time.perf_counter() - t0) / n * 1e6
    per_graph = 50
    for name, fns in (("graph_noop_us", (task.sync,)), ("graph_pair_us", (task.enqueue, task.sync))):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            cap = torch.cuda.current_stream(dev).cuda_stream
            for _ in range(per_graph):
                for hf in fns:
                    host.launch(cap, hf)
        g.replay()
        torch.cuda.synchronize(dev)
        reps = max(1, n // per_graph)
        t0 = time.perf_counter()
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize(dev)
        out[name] = (time.perf_counter() - t0) / (reps * per_graph) * 1e6
        del g
    if task.completed != task.submitted:
        raise AssertionError("host functions replayed in a graph did not run every enqueued task")
    out["graph_replays_ran_tasks"] = True
    return out


# ---- one configuration -----------------------------------------------------------------------------

def _replicated_weights(layer: ExpertLayerSpec, fmt: str, seed: int) -> ExpertWeights:
    g = torch.Generator().manual_seed(weights_seed(seed, fmt))
    h, i = layer.hidden_size, layer.intermediate_size
    one = ExpertTensors(random_matrix(i, h, fmt, g), random_matrix(i, h, fmt, g), random_matrix(h, i, fmt, g))
    return ExpertWeights({e: one for e in range(layer.num_experts)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(runner, inputs, device, plan: TimingPlan, chain: int) -> list[float]:
    """Seconds per step: `chain` steps back to back, then one synchronization, per timed call."""
    times = []
    i = 0
    for _ in range(plan.warmup):
        runner.run(*inputs[i % len(inputs)])
        i += 1
    _sync(device)
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        for _ in range(chain):
            runner.run(*inputs[i % len(inputs)])
            i += 1
        _sync(device)
        times.append((time.perf_counter() - t0) / chain)
        spent = time.perf_counter() - start
        if len(times) >= plan.max_iters or (len(times) >= plan.min_iters and spent >= plan.min_seconds):
            return times


def _standard_path(layer, host, device, h, ids, w, dev) -> torch.Tensor:
    """The tiered layer's standard path (CPU shards on the host, device shards on the device, summed
    in fp32 in its order), to check the hybrid step against."""
    cpu = torch.device("cpu")
    parts = [s.backend.forward(s.prepared, h.to(cpu), ids.to(cpu), w.to(cpu)) for s in host]
    parts += [s.backend.forward(s.prepared, h, ids, w) for s in device]
    out = parts[0].to(dev)
    for p in parts[1:]:
        out = out + p.to(dev)
    return out


def measure(layer: ExpertLayerSpec, shape: str, fmt: str, share: float, batch: int, host: list, device: list,
            streams, ring: StagingRing, *, graph: bool, plan: TimingPlan, seed: int,
            bandwidth: float | None, cost_model: CostModel | None = None) -> HybridRow:
    dev = streams.device
    step = HybridStep(layer, host, device, streams, ring)
    routings = random_routing(layer, batch, 8, seed + batch)
    hidden = random_hidden(layer, batch, seed + 1000 + batch).to(dev)
    inputs = [(hidden, r.topk_ids.to(dev), r.topk_weights.to(dev)) for r in routings]
    dev_ids = set(e for s in device for e in s.prepared.expert_ids)
    dev_pairs = total_pairs = 0
    dev_bytes, cpu_bytes = [], []
    per_expert = layer.expert_bytes(fmt)
    for r in routings:
        flat = r.topk_ids.reshape(-1).tolist()
        total_pairs += len(flat)
        dev_pairs += sum(1 for e in flat if e in dev_ids)
        distinct = set(flat)
        dev_bytes.append(len(distinct & dev_ids) * per_expert)
        cpu_bytes.append(len(distinct - dev_ids) * per_expert)
    kinds = []
    if host and device:
        kinds = [("host",), ("device",), ("host", "device")]
    elif host:
        kinds = [("host",)]
    else:
        kinds = [("device",)]
    use_graph = graph and dev.type == "cuda"
    runners = {k: step.runner(batch, hidden_dtype=torch.bfloat16, graph=use_graph, parts=k) for k in kinds}
    joint = runners[kinds[-1]]
    h0, i0, w0 = inputs[0]
    got = joint.run(h0, i0, w0).clone()
    _sync(dev)
    joint.check()
    matches = bool(torch.equal(got, _standard_path(layer, host, device, h0, i0, w0, dev)))
    times = {k: [] for k in kinds}
    chain = CHAIN.get(batch, 1)
    for _ in range(ROUNDS):
        for k in kinds:
            times[k] += _time(runners[k], inputs, dev, plan, chain)
    for r in runners.values():
        r.check()
    med = {k: statistics.median(v) for k, v in times.items()}
    predicted = (None, None, None)
    if cost_model is not None:
        counts = torch.bincount(torch.cat([r.topk_ids.reshape(-1) for r in routings]), minlength=layer.num_experts)
        p = counts.to(torch.float64) / (len(routings) * batch)  # chance that one token routes to each expert
        predicted = cost_model.predict(layer, fmt, p, batch, sorted(dev_ids))
    return HybridRow(
        shape=shape, num_experts=layer.num_experts, top_k=layer.top_k, hidden=layer.hidden_size,
        intermediate=layer.intermediate_size, fmt=fmt, share=share, batch=batch, graph=use_graph,
        device_experts=len(dev_ids), cpu_experts=layer.num_experts - len(dev_ids),
        device_pair_share=dev_pairs / total_pairs,
        cpu_s=med.get(("host",)), device_s=med.get(("device",)), joint_s=med[kinds[-1]],
        device_expert_bytes=float(statistics.fmean(dev_bytes)), cpu_expert_bytes=float(statistics.fmean(cpu_bytes)),
        device_bandwidth=bandwidth, iterations=min(len(v) for v in times.values()), matches_standard_path=matches,
        predicted_cpu_s=predicted[0], predicted_device_s=predicted[1], predicted_s=predicted[2])


# ---- the whole run ---------------------------------------------------------------------------------

class CostModel:
    """The placement cost model's view of one hybrid layer: per-tier speeds, `expert_time` per expert
    (summed over a part's experts), and the fixed per-layer costs of its `Speeds`."""

    def __init__(self, inventory, threads: int, device_name: str | None):
        from ..placement.speeds import Speeds, accelerator_speed, measured_cpu

        self.cpu = measured_cpu(inventory, threads)
        self.device = accelerator_speed(device_name)
        self.speeds = Speeds({"cpu": self.cpu, "device": self.device})

    def describe(self) -> dict:
        return {"available": True, "cpu": self.cpu.source, "device": self.device.source,
                "layer_overhead_s": self.speeds.layer_overhead_s, "hybrid_overhead_s": self.speeds.hybrid_overhead_s,
                "note": "moetier.placement.cost.expert_time per part with the bench's routing probabilities; joint = "
                        "the slower part + the fixed per-layer costs"}

    def predict(self, layer: ExpertLayerSpec, fmt: str, p: torch.Tensor, batch: int, device_ids: list[int]):
        from ..placement.cost import expert_time

        dev = torch.zeros(layer.num_experts, dtype=torch.bool)
        dev[device_ids] = True
        nbytes, per_pair = layer.expert_bytes(fmt), 6 * layer.hidden_size * layer.intermediate_size
        parts = {}
        for name, speed, mask in (("cpu", self.cpu, ~dev), ("device", self.device, dev)):
            if mask.any():
                parts[name] = float(expert_time(speed, nbytes, p[mask], batch, per_pair, fmt).sum())
        overhead = self.speeds.layer_overhead_s + (self.speeds.hybrid_overhead_s if len(parts) == 2 else 0.0)
        return parts.get("cpu"), parts.get("device"), max(parts.values()) + overhead


def make_cost_model(inventory, threads: int, device_name: str | None):
    """(CostModel or None, its description for the JSON)."""
    try:
        model = CostModel(inventory, threads, device_name)
    except ImportError as exc:
        return None, {"available": False, "note": f"no placement cost model in this build ({exc}): no predictions"}
    return model, model.describe()


def goals(rows: list[HybridRow]) -> list[dict]:
    out = []
    for shape in sorted({r.shape for r in rows}):
        b1 = [r for r in rows if r.shape == shape and r.batch == 1 and r.overlap is not None]
        if b1:
            worst = min(b1, key=lambda r: r.overlap)
            out.append({"goal": f"overlap efficiency >= {GOAL_OVERLAP_B1} at batch 1 ({shape})",
                        "value": worst.overlap, "where": f"share {worst.share:.0%} (worst of {len(b1)})",
                        "met": worst.overlap >= GOAL_OVERLAP_B1})
    ds = [r for r in rows if r.shape == "deepseek-v3" and r.batch == 1 and r.graph and r.device_bw_share is not None]
    if ds:
        best = max(ds, key=lambda r: r.device_bw_share)
        out.append({"goal": f"device experts at >= {GOAL_DEVICE_BW_SHARE:.0%} of memory bandwidth, DeepSeek-V3 "
                            "shape, batch 1, captured graph",
                    "value": best.device_bw_share, "where": f"share {best.share:.0%}",
                    "met": best.device_bw_share >= GOAL_DEVICE_BW_SHARE})
    return out


def make_backends(config: HybridBenchConfig, registry, inventory):
    cpu = registry.backend(config.cpu_backend).create(inventory, threads=config.threads)
    if not host_task_backend(cpu):
        raise BackendUnavailable(f"backend {config.cpu_backend} runs no host tasks: the hybrid step needs a native "
                                 "CPU backend (cpu.avx2, cpu.avx512, cpu.amx)")
    if config.stand_in:
        device = registry.backend("cpu.accel").create(inventory)
        streams = StandInStreams(cpu.host_callback_thread())
    else:
        device = registry.backend(config.device_backend).create(inventory)
        streams = DeviceStreams.for_device(device.device)
    return cpu, device, streams


def run_hybrid_bench(config: HybridBenchConfig, registry, inventory, *, status: Callable[[str], None] = lambda s: None,
                     on_update: Callable[[dict], None] = lambda doc: None) -> dict:
    """Every configuration of `config` within its time budget; `on_update(doc)` after each result (so a
    run cut short still leaves what it measured)."""
    for s in config.shares:
        if not 0.0 <= s <= 1.0:
            raise SettingError(f"shares must be in [0, 1], got {s}")
    start = time.perf_counter()
    cpu, device, streams = make_backends(config, registry, inventory)
    doc = {
        "benchmark": "moetier bench hybrid",
        "stand_in": config.stand_in,
        "note": STAND_IN_NOTE if config.stand_in else "measured on the device",
        "streams": streams.describe(),
        "cpu_backend": cpu.name, "cpu_threads": cpu.threads, "device_backend": device.name,
        "format": config.fmt, "graph": config.graph and not config.stand_in,
        "torch": torch.__version__, "cost_model": None,
        "host_functions": None, "bandwidth": None, "rows": [], "skipped": [], "goals": [],
    }
    status("host function costs")
    doc["host_functions"] = host_function_costs(cpu, streams, quick=config.quick)
    on_update(doc)
    status("the cost model's speeds (CPU probes)")
    device_name = None if config.stand_in else torch.cuda.get_device_name(device.device)
    cost_model, doc["cost_model"] = make_cost_model(inventory, cpu.threads or 1, device_name)
    bandwidth = None
    if not config.stand_in:
        status("device memory bandwidth")
        doc["bandwidth"] = device_bandwidth(device.device)
        bw = doc["bandwidth"]
        bandwidth = bw["nominal_bytes_per_s"] or bw["copy_bytes_per_s"]
        on_update(doc)
    rows: list[HybridRow] = []
    for shape_name in config.shapes:
        layer = get_shape(shape_name, config.max_weight_bytes).layer
        E = layer.num_experts
        status(f"{shape_name}: random {config.fmt} weights")
        weights = _replicated_weights(layer, config.fmt, config.seed)
        ring = streams.ring(layer.hidden_size) if isinstance(streams, DeviceStreams) else \
            StagingRing(streams, layer.hidden_size)
        for share in config.shares:
            n_dev = round(share * E)
            left = config.time_budget_s - (time.perf_counter() - start)
            if left <= 0:
                doc["skipped"] += [{"shape": shape_name, "share": share, "batch": b, "why": "out of time"}
                                   for b in config.batches]
                on_update(doc)
                continue
            status(f"{shape_name}: preparing {n_dev} experts on {device.name}, {E - n_dev} on {cpu.name}")
            host = [Shard(cpu, cpu.prepare(layer, weights, range(n_dev, E), config.fmt), {})] if n_dev < E else []
            dev = [Shard(device, device.prepare(layer, weights, range(n_dev), config.fmt), {})] if n_dev else []
            for batch in config.batches:
                if time.perf_counter() - start > config.time_budget_s:
                    doc["skipped"].append({"shape": shape_name, "share": share, "batch": batch, "why": "out of time"})
                    on_update(doc)
                    continue
                status(f"{shape_name}: {share:.0%} of experts on {device.name}, batch {batch}")
                plan = QUICK if config.quick else (DECODE if batch <= 8 else PREFILL)
                try:
                    row = measure(layer, shape_name, config.fmt, share, batch, host, dev, streams, ring,
                                  graph=config.graph, plan=plan, seed=config.seed, bandwidth=bandwidth,
                                  cost_model=cost_model)
                except Exception as exc:  # one configuration failing must not lose the others' figures
                    doc["skipped"].append({"shape": shape_name, "share": share, "batch": batch,
                                           "why": f"{type(exc).__name__}: {exc}"})
                    on_update(doc)
                    continue
                rows.append(row)
                doc["rows"].append(row.to_record())
                doc["goals"] = goals(rows)
                on_update(doc)
            del host, dev
            if isinstance(streams, DeviceStreams):
                torch.cuda.empty_cache()
    doc["seconds"] = time.perf_counter() - start
    on_update(doc)
    return doc
