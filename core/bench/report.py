"""Turn measurements into records (with the limits and baselines of the same run beside each one), a rich
table and a JSON document."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path

from ..errors import MoetierError
from ..formats import get_format
from ..hardware.inventory import HardwareInventory
from . import baseline as torch_baseline
from .kernels import BenchResult
from .measure import Measurement
from .probes import MachineLimits
from .workload import BENCH_FORMATS

SCHEMA = "moetier.bench.kernels/1"

# The fields every record carries (documented in docs/benchmarks.md; tests check them).
RECORD_FIELDS = (
    "shape", "num_experts", "top_k", "hidden", "intermediate", "backend", "format", "batch", "threads",
    "seconds", "seconds_p10", "seconds_p90", "iterations", "copies", "weight_bytes", "flops", "check_relerr",
    "tokens_per_s", "gb_per_s", "gflop_per_s",
    "read_gb_per_s", "peak_kind", "peak_gflop_per_s", "pct_bandwidth", "pct_peak",
    "torch_tokens_per_s", "x_vs_torch", "peer_backend", "peer_tokens_per_s", "x_vs_peer",
)


def _order(r: dict) -> tuple:
    """Table order: shape, batch, threads, then formats in the bench's order, then backend."""
    fmts = list(BENCH_FORMATS)
    f = fmts.index(r["format"]) if r["format"] in fmts else len(fmts)
    return (r["shape"], r["batch"], r["threads"], f, r["format"], r["backend"])


def _baseline_key(m: Measurement) -> tuple:
    return (m.shape, m.num_experts, m.batch, m.threads)


def build_records(measurements: Iterable[Measurement], limits: MachineLimits,
                  peers: Iterable[Measurement] = ()) -> list[dict]:
    """One record per measurement: its own numbers, the read bandwidth (best pass) and the peak (of the format's
    compute kind) at the same thread count, the torch baseline at the same shape/batch/threads, and the
    peer's same shape/format/batch/threads when given."""
    measurements = list(measurements)
    torch_rate = {_baseline_key(m): m.tokens_per_s for m in measurements if m.backend == torch_baseline.NAME}
    peer_by_key: dict[tuple, Measurement] = {}
    for p in peers:
        cur = peer_by_key.get(p.key())
        if cur is None or p.tokens_per_s > cur.tokens_per_s:
            peer_by_key[p.key()] = p
    records = []
    for m in measurements:
        rec = m.to_record()
        bw = limits.read_gb_per_s_best.get(m.threads)  # STREAM's convention: the best pass is the limit
        # a mixed format is judged by its gate/up part (two thirds of an expert's work)
        kind, peak = limits.peak_for(get_format(m.format).gate_up.kind, m.threads)
        base = torch_rate.get(_baseline_key(m))
        peer = peer_by_key.get(m.key())
        rec.update(
            read_gb_per_s=bw, peak_kind=kind, peak_gflop_per_s=peak,
            pct_bandwidth=100.0 * m.gb_per_s / bw if bw else None,
            pct_peak=100.0 * m.gflop_per_s / peak if peak else None,
            torch_tokens_per_s=base, x_vs_torch=m.tokens_per_s / base if base else None,
            peer_backend=peer.backend if peer else None,
            peer_tokens_per_s=peer.tokens_per_s if peer else None,
            x_vs_peer=m.tokens_per_s / peer.tokens_per_s if peer else None,
        )
        records.append(rec)
    return records


def document(result: BenchResult, inventory: HardwareInventory, *, command: list[str] | None = None,
             settings: dict | None = None, peers: Iterable[Measurement] = (), peer_records: list[dict] = ()) -> dict:
    """The JSON document `--json` writes."""
    import torch

    from .. import __version__

    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "moetier_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": inventory.to_dict(),
        # Other processes share small machines: the 1/5/15-minute load averages when the run began and ended.
        "load_average_start": result.load_average_start,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": settings or {},
        "limits": result.limits.to_dict(),
        "shapes": {name: s.description for name, s in result.shapes.items()},
        "notes": list(result.notes) + list(result.limits.notes),
        "records": build_records(result.measurements, result.limits, peers),
        "peer_records": list(peer_records),
    }


def write_json(doc: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load_peer_measurements(path: str | Path) -> tuple[list[Measurement], list[dict]]:
    """Measurements from a JSON file written by this bench or the peer runner in ci/ (its `records`)."""
    try:
        doc = json.loads(Path(path).read_text())
        records = doc["records"]
        return [Measurement.from_record(r) for r in records], records
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MoetierError(f"cannot read peer results from {path}: {type(exc).__name__}: {exc}") from None


# ---- rich output ----------------------------------------------------------------------------------

def _f(v, digits=1, suffix="") -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}{suffix}"


def limits_table(limits: MachineLimits):
    from rich.table import Table

    t = Table(title="Machine limits, measured in this run", title_justify="left")
    t.add_column("threads", justify="right")
    t.add_column("DRAM read GB/s: best", justify="right")
    t.add_column("median", justify="right")
    t.add_column("bf16 vdpbf16ps GFLOP/s", justify="right")
    t.add_column("int8 vpdpbusd GOP/s", justify="right")
    for th in sorted(limits.read_gb_per_s):
        t.add_row(str(th), _f(limits.read_gb_per_s_best[th]), _f(limits.read_gb_per_s[th]),
                  _f(limits.bf16_gflop_per_s.get(th)), _f(limits.int8_gop_per_s.get(th)))
    return t


def results_table(records: list[dict], peer_name: str | None = None):
    from rich.table import Table

    t = Table(title="Expert kernels (median per forward; %BW of the same-thread read bandwidth, %peak of the "
                    "format's dot-product peak)", title_justify="left")
    for col, just in (("shape", "left"), ("format", "left"), ("batch", "right"), ("thr", "right"),
                      ("backend", "left"), ("tok/s", "right"), ("GB/s", "right"), ("%BW", "right"),
                      ("GFLOP/s", "right"), ("%peak", "right"), ("x torch", "right"), ("rel err", "right")):
        t.add_column(col, justify=just)
    if peer_name:
        t.add_column(f"{peer_name} tok/s", justify="right")
        t.add_column(f"x {peer_name}", justify="right")
    order = sorted(records, key=_order)
    last = None
    for r in order:
        group = (r["shape"], r["batch"])
        if last is not None and group != last:
            t.add_section()
        last = group
        row = [r["shape"], r["format"], str(r["batch"]), str(r["threads"]), r["backend"],
               _f(r["tokens_per_s"]), _f(r["gb_per_s"]), _f(r["pct_bandwidth"], 0, "%"),
               _f(r["gflop_per_s"]), _f(r["pct_peak"], 0, "%"), _f(r["x_vs_torch"], 2, "x"),
               _f(r.get("check_relerr"), 4)]
        if peer_name:
            row += [_f(r["peer_tokens_per_s"]), _f(r["x_vs_peer"], 2, "x")]
        t.add_row(*row)
    return t


def make_console():
    """A rich console; when output is not a terminal (a log, a pipe) it is wide enough for the table."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 180))
    return console


def print_report(doc: dict, console=None) -> None:
    console = console or make_console()
    limits = MachineLimits(
        {int(k): v for k, v in doc["limits"]["read_gb_per_s"].items()},
        {int(k): v for k, v in doc["limits"]["read_gb_per_s_best"].items()},
        {int(k): v for k, v in doc["limits"]["bf16_gflop_per_s"].items()},
        {int(k): v for k, v in doc["limits"]["int8_gop_per_s"].items()},
        doc["limits"]["read_bytes"], doc["limits"]["read_isa"])
    console.print(limits_table(limits))
    for name, desc in doc["shapes"].items():
        console.print(f"[bold]{name}[/bold]: {desc}")
    peer = None
    if doc.get("peer_records"):
        peer = doc["peer_records"][0]["backend"].split(" ")[0]
    console.print(results_table(doc["records"], peer))
    for n in doc["notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")


def markdown_table(records: list[dict], peer: bool = False) -> str:
    """The results as a Markdown table (what docs/benchmarks.md records)."""
    head = ["shape", "format", "batch", "threads", "backend", "tok/s", "GB/s", "% read BW", "GFLOP/s", "% peak",
            "x torch", "rel err"]
    if peer:
        head += ["peer", "peer tok/s", "x peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(records, key=_order):
        row = [r["shape"], r["format"], str(r["batch"]), str(r["threads"]), r["backend"], _f(r["tokens_per_s"]),
               _f(r["gb_per_s"]), _f(r["pct_bandwidth"], 0, "%"), _f(r["gflop_per_s"]), _f(r["pct_peak"], 0, "%"),
               _f(r["x_vs_torch"], 2, "x"), _f(r.get("check_relerr"), 4)]
        if peer:
            row += [r["peer_backend"] or "-", _f(r["peer_tokens_per_s"]), _f(r["x_vs_peer"], 2, "x")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _loads(values) -> str:
    return " / ".join(f"{x:.1f}" for x in values) if values else "unknown"


def markdown_report(doc: dict) -> str:
    """Date, command, machine, the limits and the results of one run, as Markdown."""
    cpu = doc["machine"]["cpu"]
    lim = doc["limits"]
    lines = [
        f"- date: {doc['date']}",
        f"- command: `{' '.join(doc['command'] or [])}`",
        f"- machine: {cpu['model']} ({cpu['vendor']}, {cpu['arch']}), {cpu['physical_cores']} physical / "
        f"{cpu['logical_cores']} logical cores, {doc['machine']['dram_total_bytes'] / 2**30:.1f} GiB DRAM, "
        f"{len(doc['machine']['numa_nodes'])} NUMA node(s); features: {' '.join(cpu['features'])}",
        f"- moetier {doc['moetier_version']}, torch {doc['torch_version']}, Python {doc['python']}",
        f"- load average (1/5/15 min) at the start / end of the run: {_loads(doc.get('load_average_start'))}; "
        f"{_loads(doc.get('load_average'))} (the machine has {cpu['logical_cores']} logical cores)",
        "",
        "| threads | DRAM read GB/s (best) | median | bf16 vdpbf16ps GFLOP/s | int8 vpdpbusd GOP/s |",
        "|---|---|---|---|---|",
    ]
    for th in sorted(lim["read_gb_per_s"], key=int):
        lines.append(f"| {th} | {_f(lim['read_gb_per_s_best'][th])} | {_f(lim['read_gb_per_s'][th])} | "
                     f"{_f(lim['bf16_gflop_per_s'].get(th))} | {_f(lim['int8_gop_per_s'].get(th))} |")
    lines += ["", markdown_table(doc["records"], peer=bool(doc.get("peer_records")))]
    if doc["notes"]:
        lines += [""] + [f"- note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
