"""Run by tests/test_accel_triton.py in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads it at
import): the Triton kernel of the accelerator backend, on CPU tensors, against the float64 oracle, for
every format, with biases, unheld experts and partial blocks; and its decode step against forward().
Prints one line per check; exits non-zero on the first failure."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from moetier.backends.accel.backend import AccelBackend  # noqa: E402
from moetier.backends.accel.build import detect_build  # noqa: E402
from moetier.backends.accel.plan import plan_kernels  # noqa: E402
from moetier.conformance.tolerances import tolerance  # noqa: E402
from moetier.experts import ExpertLayerSpec, ExpertWeights  # noqa: E402
from moetier.formats import FORMATS  # noqa: E402
from moetier.reference import oracle  # noqa: E402

seed = int(sys.argv[1])
backend = AccelBackend("cpu.accel", "cpu", plan_kernels("cpu", None, detect_build()), gemm="triton")
ref = oracle()
# odd sizes (masks), partial 128-blocks (fp8 scale rows at the gate/up seam), many pairs (no split)
SHAPES = ((5, 3, 50, 37, 4, False), (6, 2, 130, 200, 3, True), (4, 2, 64, 40, 150, False))
for fmt in FORMATS:
    for i, (E, k, H, I, T, bias) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(seed * 100 + i)
        biases = (torch.randn(E, I, generator=g), torch.randn(E, I, generator=g), torch.randn(E, H, generator=g)) if bias else None
        w = ExpertWeights.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, I, H, generator=g) / H ** 0.5,
                                     torch.randn(E, H, I, generator=g) / I ** 0.5, fmt, biases=biases)
        layer = ExpertLayerSpec(E, k, H, I, activation="swiglu_oai" if bias else "silu", has_bias=bias, swiglu_limit=0.75)
        held = [e for e in range(E) if e != 1]  # expert 1 is someone else's: it must contribute nothing
        p, po = backend.prepare(layer, w, held, fmt), ref.prepare(layer, w, held, fmt)
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        tw = torch.softmax(torch.randn(T, k, generator=g), -1)
        want = ref.forward(po, x, ids, tw).double()
        got = backend.forward(p, x, ids, tw)
        err = float((got.double() - want).norm() / want.norm())
        ok = err <= tolerance(fmt)
        print(f"{'ok' if ok else 'FAIL'} {fmt} E{E} H{H} I{I} T{T}{' bias' if bias else ''}: rel {err:.2e} "
              f"(bound {tolerance(fmt):g})", flush=True)
        if not ok:
            sys.exit(1)
        if i == 0:
            runner = backend.decode_runner(p, T, hidden_dtype=torch.float32)
            same = torch.equal(runner.run(x, ids, tw), got)
            print(f"{'ok' if same else 'FAIL'} {fmt} decode step equals forward", flush=True)
            if not same:
                sys.exit(1)
print("all triton checks passed")
