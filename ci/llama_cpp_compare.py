"""moetier against llama.cpp on the same weights: logits over the same prompt, per GGUF type.

    ci/llama_cpp_bench.sh CHECKPOINT llama_logits.npz --logits 64 --types BF16,Q8_0   # llama.cpp's logits
    python ci/llama_cpp_compare.py CHECKPOINT llama_logits.npz                         # this script

CHECKPOINT is one `moetier bench model` wrote (Qwen3-MoE or DeepSeek-V3 layout, bf16; the tiny dimensions
are enough and take seconds), or a bf16 Qwen2-MoE, GLM-4.5 or MiniMax-M2 one (the zoo's tiny Qwen1.5-MoE-A2.7B, GLM-4.5-Air, MiniMax-M2
written with quant=None). moetier loads it with the experts and the dense layers in the format
llama.cpp's type stores them in (BF16: bf16; Q8_0: q8_0, which moetier's quantizer writes byte for byte as
llama.cpp's does) and activations in fp32, as llama.cpp keeps its residual stream. Both are also compared
with transformers' fp32 model on the checkpoint's weights (the exact result for BF16; for Q8_0 it adds the
weights' own quantization). The roundings still differ: llama.cpp rounds each product's input to bf16 or
to q8_0 blocks of 32 values (and stores Q8_0's embedding table in q8_0), moetier's kernels to bf16 or to
int8 per token. Each side is within about the format's conformance bound (bf16 1e-2, int8 4e-2) of the
exact result, so the bound on their difference is twice that, on the median over positions of
max |d| / max |ref| (a position where a near-tie in a router picked another expert does not decide
alone: random weights have many; the share of positions whose largest logit agrees is printed beside).
A tensor converted in the wrong layout or a routing rule read differently moves the error to order 1.

Exit status 1 when a type is over its bound.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import moetier  # first: before torch loads its OpenMP runtime (see moetier.openmp)

import numpy as np
import torch

FORMAT_OF = {"BF16": "bf16", "Q8_0": "q8_0"}


def relative(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position: max |got - ref| / max |ref| over the vocabulary."""
    return np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)


def main() -> int:
    p = argparse.ArgumentParser(prog="ci/llama_cpp_compare.py")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("logits", type=Path, help="what `ci/llama_cpp_bench.sh ... --logits N` wrote")
    p.add_argument("--backend", default=None, help="moetier's CPU backend (default: the one selected)")
    args = p.parse_args()
    from moetier.conformance.tolerances import tolerance

    import transformers

    saved = np.load(args.logits)
    prompt = torch.from_numpy(saved["prompt"]).view(1, -1)
    exact = transformers.AutoModelForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.float32)
    with torch.inference_mode():
        truth = exact(prompt).logits[0].double().numpy()
    del exact
    failed = False
    for t in (k for k in saved.files if k != "prompt"):
        fmt = FORMAT_OF.get(t)
        if fmt is None:
            print(f"{t}: no moetier format computes every tensor as llama.cpp's {t} does; skipped")
            continue
        try:
            model = moetier.load(args.checkpoint, backend=args.backend, fmt=fmt, dtype=torch.float32, device="cpu",
                                 dense_format=None if fmt == "bf16" else fmt, progress=False)
        except moetier.MoetierError as exc:
            print(f"{t}: moetier cannot load the checkpoint in {fmt}: {exc}")
            failed = True
            continue
        with torch.inference_mode():
            got = model(prompt).logits[0].float().numpy()
        model.moetier_experts.close()
        ref = saved[t]
        err = relative(got, ref)
        agree = float((got.argmax(axis=1) == ref.argmax(axis=1)).mean())
        bound = 2 * tolerance(fmt)
        ok = float(np.median(err)) <= bound
        failed |= not ok
        print(f"{t} (moetier {fmt}, dense {model.moetier_dense.fmt}): moetier against llama.cpp: median relative "
              f"error {np.median(err):.2e}, max {err.max():.2e} over {len(err)} positions (bound on the median "
              f"{bound:g}: {'ok' if ok else 'OVER'}); largest logit agrees at {100 * agree:.0f}% of positions; "
              f"against transformers fp32: llama.cpp {np.median(relative(ref, truth)):.2e}, moetier "
              f"{np.median(relative(got, truth)):.2e} (medians)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
