"""torch's OpenMP workers and moetier's kernel pool share the CPU cores: make torch's workers sleep.

libgomp (torch's OpenMP on Linux) keeps its workers spinning after every parallel region unless
OMP_WAIT_POLICY=PASSIVE, a setting it reads once, when torch loads it. moetier's kernels run on their own
pinned pool, so at each hand-over between a torch op and a kernel call a pool thread waits for the
scheduler to take its core back from a spinning torch worker: whole-model prefill on a 2-core machine ran
2.3-4.4x slower than with sleeping workers (docs/benchmarks.md). Importing moetier before torch therefore
sets the passive policy, unless the environment already chose one; when torch was imported first it is too
late, and `workers_may_spin` lets moetier.load say so.
"""
from __future__ import annotations

import os
import sys

POLICY = "OMP_WAIT_POLICY"
TORCH_IMPORTED_FIRST = "torch" in sys.modules
if not TORCH_IMPORTED_FIRST:
    os.environ.setdefault(POLICY, "PASSIVE")


def workers_may_spin() -> bool:
    """True when torch was loaded before moetier without the passive policy: its OpenMP workers spin."""
    return TORCH_IMPORTED_FIRST and os.environ.get(POLICY, "").upper() != "PASSIVE"


SPIN_ADVICE = ("torch was imported before moetier, so its OpenMP workers spin between ops on the cores "
               "moetier's kernels use (prefill measured 2-4x slower on small machines); import moetier first, "
               "or set OMP_WAIT_POLICY=PASSIVE in the environment before starting Python")
