"""A transformers quantizer named "moetier" that keeps the routed experts out of transformers' loading.

`from_pretrained` builds the model on the meta device, lets the quantizer rework the skeleton, then reads
only the checkpoint tensors the skeleton still has parameters for. Before the weights are read, this
quantizer takes the parameters off every routed-experts module of the layout's MoE layers (and marks
the module initialized), so transformers neither reads nor allocates them: their checkpoint tensors
become "unexpected keys", left on disk for moetier's reader, which packs each expert straight into the
backend and tier the placement chose.

For checkpoints that store the other linear layers in FP8 128x128 blocks (DeepSeek-V3, Kimi-K2,
MiniMax-M2), the quantizer also dequantizes those to the model's dtype on load with moetier's reference
dequantization (partial last blocks keep the 128 stride; transformers' own CPU path requires whole
blocks). transformers' quantizer registries are its public extension point for load-time rewrites.
"""
from __future__ import annotations

import re

import torch

QUANT_METHOD = "moetier"
FP8_SERIALIZED = {"weight": ["weight", "weight_scale_inv"]}

_registered: dict[str, type] = {}


def experts_modules(model: torch.nn.Module) -> dict[int, tuple[str, torch.nn.Module]]:
    """Decoder layer index -> (name, module) of every routed-experts module ("...layers.<i>.<block>.experts")."""
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.[A-Za-z_]+\.experts$")
    out: dict[int, tuple[str, torch.nn.Module]] = {}
    for name, module in model.named_modules():
        m = pattern.search(name)
        if m:
            out[int(m.group(1))] = (name, module)
    return out


def detach_experts(model: torch.nn.Module, moe_layers) -> dict[int, torch.nn.Module]:
    """Remove the parameters of the experts modules of `moe_layers`; tag each with its layer index."""
    from ...errors import LayoutError
    from .experts import LAYER_ATTR

    found = experts_modules(model)
    wanted = set(moe_layers)
    if set(found) != wanted:
        raise LayoutError(f"transformers' {type(model).__name__} has routed experts in layers {sorted(found)}, "
                          f"the checkpoint's layout in layers {sorted(wanted)}: they must agree")
    out = {}
    for index, (_, module) in found.items():
        for pname in list(module._parameters):
            del module._parameters[pname]
        module._is_hf_initialized = True  # nothing left for transformers' weight init to fill
        setattr(module, LAYER_ATTR, index)
        out[index] = module
    return out


def register() -> tuple[type, type]:
    """(config class, quantizer class), registered with transformers once per process."""
    if _registered:
        return _registered["config"], _registered["quantizer"]
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from ...formats import QuantizedTensor, dequantize, get_format

    class MoetierLoadConfig(QuantizationConfigMixin):
        """moe_layers: the decoder layers whose routed experts moetier serves; dequantize: the checkpoint's
        other linear weights are FP8 blocks to dequantize on load."""

        def __init__(self, moe_layers=(), dequantize: bool = False, **kwargs):
            self.quant_method = QUANT_METHOD
            self.moe_layers = [int(i) for i in moe_layers]
            self.dequantize = bool(dequantize)

    class Fp8BlockDequantize(ConversionOps):
        """`weight` (float8_e4m3fn) + `weight_scale_inv` -> the parameter's dtype; other weights are cast."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer  # marks the op as reading serialized tensors (kept in their dtype)

        @staticmethod
        def _one(w: torch.Tensor, s: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
            if s is None or w.dtype != torch.float8_e4m3fn:
                return w if dtype is None else w.to(dtype)
            q = QuantizedTensor(get_format("fp8_e4m3"), tuple(w.shape), w.contiguous(), s.float().contiguous())
            return dequantize(q).to(dtype or torch.float32)

        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            dtype = None
            if model is not None and full_layer_name is not None:
                dtype = getattr(model.get_parameter_or_buffer(full_layer_name), "dtype", None)
            first = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
            if "weight" in input_dict:
                w, s = first(input_dict["weight"]), input_dict.get("weight_scale_inv")
                return {full_layer_name or "weight": self._one(w, None if s is None else first(s), dtype)}
            out = {}
            for key, value in input_dict.items():  # a model converter's chain: pair each weight with its scale
                if key.endswith("_scale_inv"):
                    continue
                scales = input_dict.get(key + "_scale_inv")
                if scales is None:
                    out[key] = value
                    continue
                ws = value if isinstance(value, list) else [value]
                ss = scales if isinstance(scales, list) else [scales]
                out[key] = [self._one(w, s, dtype) for w, s in zip(ws, ss)]
            return out

    class MoetierHfQuantizer(HfQuantizer):
        requires_calibration = False

        def __init__(self, quantization_config, **kwargs):
            kwargs["pre_quantized"] = True  # the checkpoint's tensors are read as stored, then converted
            super().__init__(quantization_config, **kwargs)
            self.serialized_names = FP8_SERIALIZED if quantization_config.dequantize else {}

        def validate_environment(self, *args, **kwargs):
            return

        def _process_model_before_weight_loading(self, model, **kwargs):
            detach_experts(model, self.quantization_config.moe_layers)
            return model

        def get_load_operations(self) -> dict:
            return {"dequantize": Fp8BlockDequantize} if self.quantization_config.dequantize else {}

        def postprocess_model(self, model, **kwargs):
            # Nothing stays quantized by transformers: the model saves and reloads as a plain model.
            self.remove_quantization_config(model)
            return model

        def is_serializable(self):
            return False

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoetierLoadConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoetierHfQuantizer)
    _registered.update(config=AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD],
                       quantizer=AUTO_QUANTIZER_MAPPING[QUANT_METHOD])
    return _registered["config"], _registered["quantizer"]
