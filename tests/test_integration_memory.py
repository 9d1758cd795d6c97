"""moetier.load never holds more than the memory budget (and what its plan keeps resident) plus about one expert: transformers never
reads or allocates the routed experts, the experts the plan puts in DRAM are packed one at a time, and the
ones it leaves on disk are not read at all. Measured in a fresh interpreter (memory earlier tests freed
but the allocator kept would be reused without growing the RSS), as peak RSS (VmHWM, reset just before
the load) above the RSS before it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs")

# A Qwen3-MoE checkpoint whose experts dominate: 4 MoE layers x 32 experts of 3 x 256 x 512 bf16 = 96 MiB
# of experts (0.75 MiB each), 2 MiB of everything else.
_PROBE = r"""
import ctypes, gc, json, shutil, sys, tempfile
import torch
torch.set_num_threads(1)
import transformers
from moetier.family import load_layout
from moetier.model_zoo._deepseek_like import config_dict
from moetier.model_zoo.tiny import TinySpec, write_tiny
from moetier.plugins import load_registry
from moetier.placement.plan import ShardSpec
import moetier

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) * 1024

def rss_before():
    # Return freed heap pages first: the load would reuse them without growing the RSS (the setup's freed
    # model, kept by the allocator), hiding what it allocates from this measurement.
    ctypes.CDLL(None).malloc_trim(0)
    return kib("VmRSS")

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM, the peak RSS, := the current RSS

folder, cpu_mib, cache_mib, as_gguf = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "gguf"
registry = load_registry()
from moetier.hardware import load_inventory
from moetier.selection import select_backends
backend = select_backends(registry, load_inventory()).for_device("cpu")  # what users get
family = registry.family("qwen")
cfg = transformers.Qwen3MoeConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=64, vocab_size=256, intermediate_size=512, moe_intermediate_size=512,
                                  num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
                                  max_position_embeddings=64, tie_word_embeddings=False)
config = config_dict(cfg, version="Qwen3-30B-A3B", architectures=["Qwen3MoeForCausalLM"])
write_tiny(TinySpec("Qwen3-30B-A3B", config, lambda: transformers.Qwen3MoeForCausalLM(cfg)), family.layout, folder,
           seed=0)
layout = load_layout(folder, registry)
source = folder
if as_gguf:  # the same weights as llama.cpp's converter writes them (BF16), converted in another process
    import subprocess
    source = folder + "/model-BF16.gguf"
    subprocess.run([sys.executable, "-c", "import importlib.util, sys; s = importlib.util.spec_from_file_location('c', "
                    "sys.argv[1]); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
                    "from pathlib import Path; m.convert_bf16(Path(sys.argv[2]), Path(sys.argv[3]))", sys.argv[5], folder, source], check=True)

# Warm-up on a small checkpoint: imports, kernels and first-use allocations are not the load's.
small = tempfile.mkdtemp()
family.tiny("Qwen3-30B-A3B", small, seed=0)
m = moetier.load(small, dtype=torch.float32, backend=backend, threads=1, progress=False)
m(torch.tensor([[1, 2, 3]]))
m.moetier_experts.close()
del m
gc.collect()
shutil.rmtree(small)

before = rss_before()
reset_peak()
# The budgets of `moetier run --cpu-mem ... --disk --disk-cache ...`: a plan made here (uniform strategy) keeps
# what fits in DRAM and leaves the rest on disk.
model = moetier.load(source, dtype=torch.float32, backend=backend, threads=1, progress=False,
                     cpu_mem=cpu_mib * 2**20, disk=True, disk_cache=cache_mib * 2**20)
peak, after = kib("VmHWM") - before, kib("VmRSS") - before
dense = sum(t.numel() * t.element_size() for t in model.state_dict().values())
tiers = model.moetier_experts.bytes_per_tier()
on_disk = sum(len(layer.disk.expert_ids) for layer in model.moetier_experts.values() if layer.disk is not None)
with torch.inference_mode():
    finite = bool(torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all())
model.moetier_experts.close()
del model
gc.collect()

# Control: transformers' own loading of the same checkpoint materializes every expert (in fp32).
before = rss_before()
reset_peak()
hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager")
hf_peak = kib("VmHWM") - before
experts_bytes = sum(t.numel() * t.element_size() for n, t in hf.state_dict().items() if ".experts." in n)
print(json.dumps(dict(backend=backend, on_disk=on_disk, peak=peak, after=after, dense=dense, tiers=tiers, finite=finite, hf_peak=hf_peak,
                      hf_experts_bytes=experts_bytes, expert_bytes=3 * 256 * 512 * 2, layer_bytes=32 * 3 * 256 * 512 * 2)))
"""


@linux_only
@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_loading_stays_within_the_budget_plus_one_expert(tmp_path, source):
    """The same for the checkpoint converted to a BF16 GGUF file (its experts read in their own type; those
    left in the file read on demand without keeping their pages)."""
    if source == "gguf":
        pytest.importorskip("gguf")
    cpu_mib, cache_mib = 64, 8  # the budget also reserves 36 MiB for a 4096-token context: 24 of 128 experts fit
    # A fixed mmap threshold makes glibc return every freed expert buffer at once, so RSS shows what is held.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    converter = Path(__file__).parents[1] / "ci" / "llama_cpp_bench.py"
    r = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "ckpt"), str(cpu_mib), str(cache_mib), source,
                        str(converter)], capture_output=True, text=True, env=env, timeout=600)
    if "clear_refs" in r.stderr:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    mib = 2**20
    in_dram = m["tiers"]["cpu:numa0"]
    resident_plan = in_dram + cache_mib * mib + m["dense"]  # what the plan keeps in DRAM
    # One expert's working set: its three matrices as read (bf16), converted (fp32) and packed (bf16).
    one_expert = 4 * m["expert_bytes"]
    # RSS also counts the checkpoint's file pages the reader has mapped since its last release; the loader
    # releases them after every layer, so at most one layer's experts (clean page cache, not allocations).
    mapped = m["layer_bytes"]
    fixed = 16 * mib  # the model skeleton, transformers' loading bookkeeping, allocator rounding
    print(f"{m['backend']}: moetier.load peak RSS growth {m['peak'] / mib:.1f} MiB (resident after "
          f"{m['after'] / mib:.1f} MiB) with --cpu-mem {cpu_mib} MiB: experts in DRAM {in_dram / mib:.1f} MiB, "
          f"{m['on_disk']} on disk, cache {cache_mib} MiB, dense {m['dense'] / mib:.1f} MiB; transformers' own load "
          f"{m['hf_peak'] / mib:.1f} MiB")
    assert m["finite"]
    assert 0 < in_dram < m["hf_experts_bytes"] / 2 and m["on_disk"] > 0, m  # the budget split the experts
    # Control: the measurement sees materialized experts (transformers holds all of them in fp32).
    assert m["hf_peak"] > 0.9 * m["hf_experts_bytes"] > cpu_mib * mib + one_expert + mapped + fixed, m
    assert m["after"] > 0.9 * in_dram, "control: the packed experts must show in the RSS"
    # The budget (which also reserves the KV cache and activations of a 4096-token context, not allocated
    # at load) plus one expert, and, tighter, what the plan keeps in DRAM plus one expert.
    assert m["peak"] <= cpu_mib * mib + one_expert + mapped + fixed, m
    assert m["peak"] <= resident_plan + one_expert + mapped + fixed, m
    # What stays resident is the plan's (packed memory is mapped to the size of what it holds: a 256 KiB
    # matrix or a one-expert cache entry does not take a 2 MiB huge page).
    assert m["after"] <= resident_plan + fixed, m
