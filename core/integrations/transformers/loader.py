"""moetier.load: a transformers model whose routed experts run on moetier's runtime.

transformers builds the model and reads everything but the routed experts (attention, dense MLPs, shared
experts, norms, embeddings, LM head) straight onto the target device in the requested dtype; the
"moetier" quantizer (quantizer.py) removes the experts' parameters before any tensor is read, so
transformers never reads or allocates them. moetier's checkpoint reader then packs each expert into the
backend and tier the placement plan chose (moetier.runtime.load_experts), and every experts module gets
its layer's runtime attached; transformers' experts dispatch (experts.py) calls it with the router's
choices. Dense linear layers left on the CPU move onto the experts' CPU backend's kernels (dense.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
import weakref
from pathlib import Path

import torch

from ... import openmp
from ...errors import CheckpointError, LayoutError, MoetierError, SettingError
from ...formats import get_format
from . import attention as attention_mod
from . import dense as dense_mod
from . import experts as experts_mod
from . import decode_layer, decode_model, mla, quantizer

DTYPES = (torch.float32, torch.bfloat16)


def checkpoint_folder(model: str | os.PathLike) -> Path:
    """The checkpoint folder of `model` (the folder itself, or the folder of a config.json)."""
    p = Path(model)
    if p.is_file():
        return p.parent
    if not p.exists():
        raise SettingError(f"model {model}: no such file or folder; name a checkpoint folder with a config.json, "
                           "or the config.json itself")
    return p


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: the first CUDA device when torch sees one, else the CPU. An explicit device must exist."""
    if device is None:
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SettingError(f"device {device!r} is not a torch device: {exc}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"device {device} was asked for, but torch sees no CUDA device")
        index = 0 if d.index is None else d.index
        if index >= torch.cuda.device_count():
            raise SettingError(f"device {device} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
        d = torch.device("cuda", index)
    elif d.type != "cpu":
        raise SettingError(f"device {device}: only cpu and cuda are supported for the dense layers")
    return d


def gguf_dense_state_dict(path: Path, hf_config, cls, dtype: torch.dtype, progress) -> dict[str, torch.Tensor]:
    """Every tensor transformers' model holds besides the routed experts, read from the GGUF file under the
    model's names (moetier.checkpoint.gguf.hf_state_dict): in `dtype`, 1-D tensors and routers in fp32 (as the
    file keeps them; transformers casts what it keeps in its own dtype)."""
    from ...checkpoint.gguf import GGUFFile, hf_state_dict

    with torch.device("meta"):
        skeleton = cls(hf_config)  # names, shapes: no memory
    experts = tuple(name + "." for name, _ in quantizer.experts_modules(skeleton).values())
    wanted = {name: (tuple(t.shape), torch.float32 if t.ndim == 1 or name.endswith("mlp.gate.weight") else dtype)
              for name, t in skeleton.state_dict().items() if not name.startswith(experts)}
    with GGUFFile(path) as gf:
        return hf_state_dict(gf, wanted, progress=progress)


class gguf_matrices:
    """A dense linear's weight as a GGUF file stores it when that is a quantized type (Q8_0, Q4_K, ...), by
    transformers' module name; for route_dense. None for a float type (F32 / F16 / BF16: computed in the
    model's dtype, as from a safetensors file), a type moetier has no format for, or a name the gguf
    package maps to no tensor."""

    def __init__(self, path: Path):
        from ...checkpoint.gguf import GGUFFile, tensor_names

        self._gf = GGUFFile(path)
        self._name = tensor_names(self._gf)

    def __call__(self, module_name: str):
        gname = self._name(module_name + ".weight")  # (a tied LM head has no tensor of its own)
        if gname is None or not self._gf.has(gname) or len(self._gf.dims(gname)) != 2:
            return None
        return self._quantized(gname)

    def kv_b_halves(self, attention_name: str):
        """An MLA module's k_b [heads * kv_rank, nope] and v_b [heads * v, kv_rank] as llama.cpp's absorbed
        MLA stores them (W_kb^T / W_vb, one block per head: what mla.route_absorbed packs), each or None."""
        gname = self._name(attention_name + ".kv_b_proj.weight")
        if gname is None:
            return None, None
        return tuple(self._quantized(gname.replace("attn_kv_b", half)) for half in ("attn_k_b", "attn_v_b"))

    def _quantized(self, gname: str):
        if not self._gf.has(gname):
            return None
        fmt = self._gf.native_format(gname)
        return None if fmt is None or fmt.kind == "float" else self._gf.matrix(gname)

    def close(self) -> None:
        self._gf.close()


def hf_model_class(folder: Path | None, raw: dict, layout):
    """(transformers config, causal-LM class, key_mapping) for the checkpoint's language model (`folder`
    None: the config comes from `raw` alone, as a GGUF file's metadata gives it).

    Multimodal wrappers (Qwen3.5, Kimi-K2.5) run their text model alone. A model_type transformers does not
    know (Kimi-K2's `kimi_k2`) is read through its `architectures` class, as transformers' own loader needs
    the class's model_type to find its weight conversions. Remote code is never run."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    mt = raw.get("model_type")
    archs = list(raw.get("architectures") or ())
    if folder is None and mt in CONFIG_MAPPING:
        config = CONFIG_MAPPING[mt].from_dict(raw)
    elif mt in CONFIG_MAPPING:
        config = AutoConfig.from_pretrained(str(folder))
    else:
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        if cls is None:
            raise LayoutError(f"transformers {transformers.__version__} has no model class for model_type {mt!r} "
                              f"(architectures {archs}): such checkpoints ship their modeling as remote code, "
                              "which moetier does not run")
        config = cls.config_class.from_dict(raw) if folder is None else cls.config_class.from_pretrained(str(folder))
        config.model_type = cls.config_class.model_type
    text = config.get_text_config(decoder=True)
    for c in {id(config): config, id(text): text}.values():
        if getattr(c, "quantization_config", None) is not None:
            del c.quantization_config  # moetier reads the experts' quantization; the rest is dequantized on load
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text), None)
    if cls is None:
        raise LayoutError(f"transformers {transformers.__version__} has no causal-LM class for "
                          f"{type(text).__name__} (model_type {text.model_type!r})")
    return text, cls, key_mapping(layout)


def key_mapping(layout) -> dict[str, str] | None:
    """Checkpoint-name prefixes -> the text model's ("language_model.model." -> "model.", Kimi-K2.5)."""
    block = layout.moe_layers[0].names.block if layout.moe_layers else "model.layers.{layer}.mlp"
    prefix = block[: block.index("layers.")]
    if prefix == "model.":
        return None
    mapping = {"^" + re.escape(prefix): "model."}
    outer = prefix[: -len("model.")] if prefix.endswith(".model.") else ""
    if outer:
        mapping["^" + re.escape(outer) + r"lm_head\."] = "lm_head."
    return mapping


@contextlib.contextmanager
def _quiet_transformers(progress: bool):
    """transformers logs each unread checkpoint tensor (here: every expert); moetier checks the report itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _check_report(info: dict, folder: Path) -> None:
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} weight(s) transformers' model needs are not in the checkpoint "
                              f"(first: {', '.join(missing[:4])})")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, got, want = mismatched[0]
        raise CheckpointError(f"{folder}: {len(mismatched)} weight(s) have another shape than the config gives "
                              f"(first: {name} {list(got)} vs {list(want)})")
    errors = dict(info.get("conversion_errors") or {})
    if errors or info.get("error_msgs"):
        first = next(iter(errors.items()), None) or ("", info["error_msgs"][0])
        raise CheckpointError(f"{folder}: transformers could not convert weight {first[0]}: {first[1]}")

ACCELERATOR_PREFIXES = ("cuda", "rocm", "npu")


def plan_from_budgets(folder: Path, layout, registry, inventory, *, cpu_backend: str, cpu_format: str | None = None,
                      gpu_mem: int | None = None, cpu_mem: int | None = None, disk: bool = False,
                      disk_cache: int | None = None, strategy: str | None = None, stats=None,
                      threads: int | None = None):
    """A PlacementPlan of the checkpoint for this machine from memory budgets (bytes; None: detected), the
    way `moetier plan` makes one: a strategy (default: cost with statistics, else uniform) fills the tiers
    fastest first; PlanBudgetError with the numbers when the model does not fit."""
    from ...placement.budgets import default_context, make_budgets
    from ...placement.models import resolve_model
    from ...placement.planner import make_plan, tier_compute
    from ...placement.speeds import make_speeds
    from ...placement.stats import ActivationStats

    if gpu_mem and not inventory.accelerators:
        # `moetier plan` may plan for a GPU this machine lacks; a run here cannot use one.
        raise SettingError("--gpu-mem: this machine has no accelerator (see `moetier doctor`); leave it out or "
                           "give --gpu-mem 0 to run on the CPU")
    info = resolve_model(str(folder), registry)
    if stats is not None and not isinstance(stats, ActivationStats):
        m0 = layout.moe_layers[0].experts
        stats = ActivationStats.load(stats, layout.moe_layer_indices, num_hidden_layers=layout.num_hidden_layers,
                                     top_k=m0.top_k)
    chosen = registry.placement(strategy or ("cost" if stats is not None else "uniform"))
    accel = {}
    for spec in sorted(registry.backends.values(), key=lambda s: s.name):
        if spec.device != "cpu":
            accel.setdefault(spec.device, spec.name)
    budgets = make_budgets(info.parts, inventory, registry.tiers.values(), gpu_mem=gpu_mem, cpu_mem=cpu_mem,
                           disk=disk, disk_cache=disk_cache, context=default_context(info.config))
    compute = tier_compute(layout, budgets, cpu_backend=cpu_backend, cpu_formats=registry.backend(cpu_backend).formats,
                           cpu_mixed=registry.backend(cpu_backend).mixed_formats,
                           accelerator_backends=accel, cpu_format=cpu_format)
    speeds = None
    if chosen.name == "cost":  # the cost model trades tiers by their speeds: measured here, as `moetier plan` does
        speeds = make_speeds(budgets, inventory, measure=inventory.source == "detected", threads=threads,
                             cpu_backend=cpu_backend)
    return make_plan(layout, info.parts, budgets, chosen, compute, stats=stats, speeds=speeds,
                     notes=(f"model: {info.source}",))


def _check_plan_here(plan, layout, inventory) -> torch.device | None:
    """A placement plan against the model and this machine; the device it puts the dense parts on."""
    plan.validate(layout)  # made for this model, and every tier within its budget
    here = {f"{a.kind}:{a.index}" for a in inventory.accelerators}
    used = set(plan.tier_names) | set(plan.part_tiers.values())
    missing = sorted(t for t in used if t.startswith(ACCELERATOR_PREFIXES) and t not in here)
    if missing:
        raise SettingError(f"the plan puts parts of the model on {', '.join(missing)}, which this machine lacks "
                           f"(accelerators here: {', '.join(sorted(here)) or 'none'}); make a plan here with "
                           "`moetier plan`")
    parts = set(plan.part_tiers.values())
    if len(parts) > 1:
        raise SettingError(f"the plan splits the dense parts over {', '.join(sorted(parts))}; moetier.load keeps "
                           "them on one device")
    if not parts:
        return None
    tier = parts.pop()
    return torch.device(tier) if tier.startswith("cuda") else torch.device("cpu")


def load(model: str | os.PathLike, plan=None, *, dtype: torch.dtype = torch.bfloat16,
         device: str | torch.device | None = None, threads: int | None = None, backend: str | None = None,
         fmt: str | None = None, gpu_mem: int | None = None, cpu_mem: int | None = None, disk: bool = False,
         disk_cache: int | None = None, strategy: str | None = None, stats=None, cache_bytes: int | None = None,
         prefetch: bool = True, registry=None, inventory=None, progress: bool | None = None,
         attn_implementation: str | None = None, dense_format: str | None = None):
    """Load checkpoint `model` (a folder, its config.json, or a GGUF file) as a transformers causal LM whose
    routed experts run on moetier. A GGUF file (llama.cpp's; architectures qwen3moe, qwen2moe, glm4moe,
    minimax-m2 and deepseek2) is read as it is: its other tensors dequantized into transformers' model, its
    experts packed in the types it stores them in, layer by layer (a Q4_K_M file's layers differ); memory
    budgets plan safetensors checkpoints only.

    Where the experts go, one of:
    - plan: a moetier.placement.PlacementPlan or the path of its JSON (`moetier plan --json`), checked
      against the model and this machine before anything is read (it also says where the dense parts go
      and the disk tier's cache); any object with `shards(layer)` is taken as is;
    - budgets (bytes): gpu_mem, cpu_mem, disk (leave what does not fit on disk), disk_cache, with a
      strategy (default: cost with `stats`, else uniform) and stats (ActivationStats or its file): a plan
      made here as `moetier plan` makes one (PlanBudgetError with the numbers when it does not fit);
    - neither: every expert on one CPU backend (`backend`, else the one the selection picks).
    fmt: the CPU experts' format (default: the checkpoint's; a backend that does not compute it is a
    FormatError, never a silent conversion).
    dtype: float32 or bfloat16, for everything transformers holds (activations included). device: where
    that goes (default: the plan's tier for it, else the first CUDA device when there is one, else the
    CPU). dense_format: the dense linear layers left on the CPU (attention, dense MLPs, shared experts, LM
    head; not the routers) run on the experts' CPU backend's kernels in this format (default: the model's
    dtype, where that backend computes dense matrices; from a GGUF file, each matrix the file quantizes
    (Q8_0, Q4_K, ...) in its own type where the backend computes it, as llama.cpp reads it; "transformers":
    transformers' own layers).
    attn_implementation: transformers' attention implementation; unset, decode attention on the CPU runs on
    the experts' CPU backend's kernels where it computes the model's dtype ("moetier": must, else an error),
    prefill on transformers' sdpa. threads: the CPU backends' kernel threads. cache_bytes: the DRAM cache of
    experts left on disk (default: the plan's).

    The model carries `moetier_experts` (moetier.runtime.ModelExperts: `bytes_per_tier()`,
    `set_recorder()`, `close()`), `moetier_layout`, `moetier_dense` (a DenseRouting) and `moetier_attention`
    (the name of the backend computing decode attention, or None)."""
    from ...checkpoint import Checkpoint
    from ...checkpoint.gguf import GGUFFile, is_gguf, verify_gguf
    from ...checkpoint.progress import progress_enabled
    from ...errors import BackendUnavailable
    from ...family import load_layout, read_config
    from ...hardware import load_inventory
    from ...plugins import get_registry
    from ...placement.plan import single_tier_plan
    from ...runtime import load_experts
    from ...runtime.moe_block import default_format

    if dtype not in DTYPES:
        raise SettingError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if dense_format is not None and dense_format != dense_mod.KEEP:
        get_format(dense_format)  # an unknown name fails before anything is read
    gguf_file = Path(model) if is_gguf(model) else None
    registry = registry or get_registry()
    if gguf_file is not None:
        folder = gguf_file  # named in errors
        with GGUFFile(gguf_file) as gf:  # header only: config, layout, every MoE tensor with its shape
            raw = gf.model_config()
            layout = load_layout(raw, registry)
            layout = dataclasses.replace(layout, quantization=gf.stored_formats(layout))  # each layer's own types
            verify_gguf(gf, layout)
    else:
        folder = checkpoint_folder(model)
        raw = read_config(folder)
        layout = load_layout(raw, registry)
    budgets = {"gpu_mem": gpu_mem, "cpu_mem": cpu_mem, "disk_cache": disk_cache, "strategy": strategy,
               "stats": stats}
    asked = sorted(k for k, v in budgets.items() if v is not None) + (["disk"] if disk else [])
    beside = asked + [k for k, v in (("backend", backend), ("fmt", fmt)) if v is not None]
    if plan is not None and beside:
        raise SettingError(f"a plan already says where every expert goes and how it is computed: give no "
                           f"{', '.join(beside)} beside it")
    inventory = inventory or load_inventory()
    if isinstance(plan, (str, os.PathLike)):
        from ...placement import PlacementPlan
        plan = PlacementPlan.load(plan)
    if asked:
        cpu_backend = backend
        if cpu_backend is None:
            from ...selection import select_backends
            cpu_backend = select_backends(registry, inventory).for_device("cpu")
            if cpu_backend is None:
                raise SettingError("no CPU backend can run here (see `moetier doctor`)")
        plan = plan_from_budgets(folder, layout, registry, inventory, cpu_backend=cpu_backend, cpu_format=fmt,
                                 gpu_mem=gpu_mem, cpu_mem=cpu_mem, disk=disk, disk_cache=disk_cache, strategy=strategy,
                                 stats=stats, threads=threads)
        backend = fmt = None
    if plan is not None and hasattr(plan, "validate"):
        planned = _check_plan_here(plan, layout, inventory)
        if device is None and planned is not None:
            device = planned
        if cache_bytes is None and getattr(plan, "disk_cache_bytes", 0):
            cache_bytes = plan.disk_cache_bytes
    dev = resolve_device(device)
    if dev.type != "cpu" and dense_format not in (None, dense_mod.KEEP):
        raise SettingError(f"the dense layers go to {dev}, where transformers computes them: dense_format="
                           f"{dense_format!r} applies to dense layers on the CPU")
    attention_mod.check_name(attn_implementation)
    if dev.type != "cpu" and attn_implementation == attention_mod.NAME:
        raise SettingError(f"the attention goes to {dev}: attn_implementation='{attention_mod.NAME}' computes it on "
                           f"the CPU; leave it unset or name one of transformers' implementations")
    if backend is not None:  # checked before anything is read: an unknown or unusable backend fails at once
        spec = registry.backend(backend)
        verdict = spec.safe_probe(inventory)
        if not verdict.usable:
            raise BackendUnavailable(f"backend {backend} cannot run here: {verdict.reason}")
        if gguf_file is not None:  # each layer in the format the file stores it in (or fmt for all)
            from ...runtime.gguf_model import file_formats

            with GGUFFile(gguf_file) as gf:
                plan, fmt = single_tier_plan(layout, backend, file_formats(gf, layout, spec, fmt)), None
        else:
            fmt = fmt or default_format(layout, spec)  # the checkpoint's own; FormatError if the backend lacks it
            if not spec.computes(fmt):
                raise SettingError(f"backend {backend} does not compute format {fmt!r}; it computes "
                                   f"{', '.join(spec.formats)}")
            plan, fmt = single_tier_plan(layout, backend, fmt), None

    if gguf_file is None:
        with Checkpoint(folder) as ckpt:
            ckpt.verify_files()  # every shard's header against its size: a truncated download fails here, named

    experts_mod.register()
    config_cls, _ = quantizer.register()
    try:
        hf_config, cls, mapping = hf_model_class(None if gguf_file else folder, raw, layout)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # transformers' config classes refusing the config
        raise LayoutError(f"{folder}: transformers cannot read the config: {type(exc).__name__}: {exc}") from exc
    qconfig = config_cls(moe_layers=layout.moe_layer_indices, dequantize=layout.quantization.scheme == "fp8_block")
    kwargs = dict(config=hf_config, dtype=dtype, experts_implementation=experts_mod.IMPLEMENTATION,
                  quantization_config=qconfig, output_loading_info=True)
    if dev.type != "cpu":
        # Straight onto the device, never through a CPU copy; transformers needs accelerate for a device_map.
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise SettingError(f"loading onto {dev} needs the accelerate package: pip install 'moetier[hf]'")
        kwargs["device_map"] = {"": str(dev)}
    if mapping:
        kwargs["key_mapping"] = mapping
    if attn_implementation not in (None, attention_mod.NAME):  # "moetier" is set once the backends exist
        kwargs["attn_implementation"] = attn_implementation
    source = str(folder)
    if gguf_file is not None:  # transformers reads the dense tensors from a state dict made from the file
        kwargs["state_dict"] = gguf_dense_state_dict(gguf_file, hf_config, cls, dtype, progress)
        source = None
    with _quiet_transformers(progress_enabled(progress)):
        try:
            hf_model, info = cls.from_pretrained(source, **kwargs)
        except MoetierError:
            raise
        except Exception as exc:  # transformers' many error types for a checkpoint it cannot build or read
            raise CheckpointError(f"{folder}: transformers could not load {cls.__name__}: "
                                  f"{type(exc).__name__}: {exc}") from exc
    _check_report(info, folder)

    kwargs.pop("state_dict", None)  # the tensors are the model's now: hold no second reference while packing
    experts = load_experts(str(folder), plan=plan, fmt=fmt, registry=registry, inventory=inventory, threads=threads,
                           cache_bytes=cache_bytes, prefetch=prefetch, progress=progress)
    try:
        for index, (_, module) in quantizer.experts_modules(hf_model).items():
            setattr(module, experts_mod.RUNTIME_ATTR, experts[index])
    except BaseException:
        experts.close()
        raise
    hf_model.moetier_experts = experts
    hf_model.moetier_layout = layout
    hf_model.moetier_dense = dense_mod.DenseRouting(None, None)
    hf_model.moetier_attention = None  # the backend whose kernels compute decode attention, if any
    hf_model.moetier_fused_decode = []  # decoder layers whose decode steps run as one call sequence
    hf_model.moetier_fused_model = False  # whether decode forwards skip transformers' model wrapper
    hf_model.moetier_mla = mla.absorb_mla(hf_model)  # decode without expanding the latent cache
    if dev.type == "cpu" and openmp.workers_may_spin() and torch.get_num_threads() > 1:
        warnings.warn(openmp.SPIN_ADVICE, RuntimeWarning, stacklevel=2)
    if dev.type == "cpu":
        try:
            dense_backend, dense_fmt = dense_mod.choose_dense_backend(list(experts.backends.values()), dense_format,
                                                                      dtype)
            if dense_backend is not None:
                # A GGUF file's matrices go to the kernels in the types it stores them in (Q4_K, Q6_K, ...),
                # unless a dense format was asked for.
                stored = gguf_matrices(gguf_file) if gguf_file is not None and dense_format is None else None
                try:
                    routed = dense_mod.route_dense(hf_model, layout, dense_backend, dense_fmt,
                                                   keep={f"{n}.kv_b_proj" for n in hf_model.moetier_mla},
                                                   stored=stored)
                    # MLA's per-head W_kb / W_vb beside them (kv_b_proj itself stays for the prefill)
                    hf_model.moetier_dense = mla.route_absorbed(
                        hf_model, hf_model.moetier_mla, dense_backend, dense_fmt, routed,
                        stored=None if stored is None else stored.kv_b_halves)
                finally:
                    if stored is not None:
                        stored.close()
            attention_backend = attention_mod.choose_attention_backend(
                list(experts.backends.values()), dtype, attn_implementation, hf_model.config._attn_implementation)
            if attention_backend is not None:
                hf_model.moetier_attention = attention_backend.name
                attention_mod.route_attention(hf_model, attention_backend)
            if dense_backend is not None:  # (layers whose attention the dense backend does not compute stay)
                hf_model.moetier_fused_decode = decode_layer.fuse_decode_layers(hf_model, dense_backend, dtype)
                hf_model.moetier_fused_model = decode_model.fuse_decode_model(
                    hf_model, hf_model.moetier_fused_decode, dense_backend, dtype)
            if dense_backend is not None or attention_backend is not None:
                cpu_backends = [b for b in experts.backends.values() if b.device.type == "cpu"]
                hf_model.moetier_decode_threads = dense_mod.DecodeThreads(hf_model, cpu_backends)
        except BaseException:
            experts.close()
            raise
    # Released with the model, or at interpreter exit at the latest: a disk tier's read-ahead thread left
    # running into the interpreter's teardown aborted the process (seen with the native backends).
    weakref.finalize(hf_model, experts.close)
    return hf_model
