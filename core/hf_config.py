"""Reading a Hugging Face `config.json` for a family: aliased keys, typed values, the text part of a
multimodal config, and the shipped quantization. Every error names the config key."""
from __future__ import annotations

from collections.abc import Mapping

from .errors import LayoutError
from .formats import get_format
from .layout import Quantization

_MISSING = object()


def text_config(config: Mapping) -> Mapping:
    """The language-model part of a config: `text_config` for multimodal wrappers, else the config."""
    tc = config.get("text_config")
    return tc if isinstance(tc, Mapping) else config


def get_key(config: Mapping, *keys: str, default=_MISSING):
    """The value of the first of `keys` present (aliases); LayoutError naming them if none is and no default."""
    for k in keys:
        if k in config and config[k] is not None:
            return config[k]
    if default is _MISSING:
        raise LayoutError(f"config.json lacks {' / '.join(repr(k) for k in keys)}")
    return default


def get_int(config: Mapping, *keys: str, default=_MISSING) -> int:
    v = get_key(config, *keys, default=default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise LayoutError(f"config key {keys[0]!r} must be an integer, got {v!r}")
    return v


def require_choice(config: Mapping, key: str, allowed: tuple, default=_MISSING):
    """config[key] (or default) if it is one of `allowed`; otherwise LayoutError naming the key."""
    v = get_key(config, key, default=default)
    if v not in allowed:
        raise LayoutError(f"config key {key!r} = {v!r} is not implemented for this family; supported: "
                          f"{', '.join(repr(a) for a in allowed)}")
    return v


def quantization_from_config(config: Mapping) -> Quantization:
    """Read `quantization_config` (top level or in text_config) into a Quantization.

    Understood: {"quant_method": "fp8", "weight_block_size": [128, 128]}, compressed-tensors
    pack-quantized symmetric int4 groups and gpt-oss's {"quant_method": "mxfp4"}. Anything else is refused
    naming the key.
    """
    qc = config.get("quantization_config") or text_config(config).get("quantization_config")
    if not qc:
        return Quantization("none", _float_format(config))
    method = qc.get("quant_method")
    if method == "fp8":
        block = list(qc.get("weight_block_size") or [])
        if block != [128, 128]:
            raise LayoutError(f"quantization_config.weight_block_size {block} is not supported; only [128, 128]")
        fmt = qc.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise LayoutError(f"quantization_config.fmt {fmt!r} is not supported; only e4m3")
        return Quantization("fp8_block", "fp8_e4m3", "all")
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized":
            raise LayoutError(f"quantization_config.format {qc.get('format')!r} is not supported; only 'pack-quantized'")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise LayoutError(f"quantization_config.config_groups must hold one group, got {len(groups)}")
        w = next(iter(groups.values())).get("weights") or {}
        if w.get("num_bits") != 4 or w.get("type") != "int" or not w.get("symmetric") or w.get("strategy") != "group":
            raise LayoutError(f"quantization_config.config_groups weights {w} are not supported; "
                              "only symmetric int4 with strategy 'group'")
        g = w.get("group_size")
        try:
            fmt = get_format(f"int4_g{g}")
        except Exception:
            raise LayoutError(f"quantization_config group_size {g!r} is not supported; use 32, 64 or 128") from None
        return Quantization("int4_pack", fmt.name, "experts")
    if method == "mxfp4":  # gpt-oss: routed experts only
        return Quantization("mxfp4", "mxfp4", "experts")
    raise LayoutError(f"quantization_config.quant_method {method!r} is not supported; supported: 'fp8', "
                      "'compressed-tensors', 'mxfp4'")


def _float_format(config: Mapping) -> str:
    dt = text_config(config).get("torch_dtype") or text_config(config).get("dtype") or config.get("torch_dtype") \
        or config.get("dtype") or "bfloat16"
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(str(dt), "bf16")
