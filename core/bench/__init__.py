"""Benchmarks: `moetier bench kernels` times expert backends through the public backend contract, side
by side with the machine's limits and the torch baseline measured in the same run.

Modules: workload (shapes, random weights and routing, byte/FLOP accounting), probes (read bandwidth
and dot-product peaks, in C++), measure (timing and the Measurement record), baseline (the torch
per-expert loop), kernels (the runner), report (records, tables, JSON), runtime (the tiered layer),
hybrid (the hybrid step on a GPU: CPU part, device part, overlap, host-function costs). The command
lines are moetier.cli.bench.
"""
