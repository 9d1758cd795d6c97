"""Decode forwards of a whole causal LM whose decoder layers are all fused (decode_layer), without
transformers' model wrapper around them.

With every layer's decode on the kernels, what remains of a step in transformers is the wrapper: the
causal LM's and the base model's forward with their decorators (config defaults, output capturing,
output dataclasses), the mask function (which returns generate's prepared mask unchanged), the layer
modules' __call__, and the final norm as ~8 torch operators. `fuse_decode_model` gives the causal LM a
forward that, for decode forwards it can reproduce, calls what the base model would call, in order:

    embed_tokens -> rotary_emb(position_ids) -> each fused layer's decode -> final norm -> lm_head

with the mask generate prepared for a compileable (static) cache: one 4D mask for every layer, or a
mapping per layer type (Qwen2-MoE's). Anything else (a 2D mask, which the model turns into a 4D one
itself; inputs_embeds; labels; outputs asked beyond the logits; gradients) goes to the model's own
forward. The base model classes below are those whose forward is exactly that sequence (per
transformers version: the tests compare the tokens and logits with the forward undone).
"""
from __future__ import annotations

import functools

import torch

from .decode_layer import MLA_NORMS, NORMS, rms_params
from .dense import DECODE_TOKENS, MoetierLinear

MODELS = ("Qwen3MoeModel", "Qwen2MoeModel", "Glm4MoeModel", "MiniMaxM2Model", "DeepseekV3Model", "Glm4MoeLiteModel")
# Keyword arguments a decode forward may carry with these values and still take the fused path (what
# generate passes); any other argument, or another value, sends the forward to the model's own.
NEUTRAL = {"use_cache": (True, None), "return_dict": (True, None), "output_attentions": (False, None),
           "output_hidden_states": (False, None), "output_router_logits": (False, None)}
# (transformers renamed past_key_values to cache in 5.2x; both are taken)
TAKEN = ("input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "logits_to_keep")


class FusedModelDecode:
    """A causal LM's decode forward over its fused layers (what `fuse_decode_model` attaches)."""

    def __init__(self, model: torch.nn.Module, fused: list, backend, dtype: torch.dtype):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        inner = model.model
        self.output = CausalLMOutputWithPast
        self.cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        self.embed, self.rotary, self.lm_head = inner.embed_tokens, inner.rotary_emb, model.lm_head
        self.fused, self.backend = fused, backend
        types = getattr(inner.config, "layer_types", None)
        self.layer_types = None if types is None else list(types[:len(fused)])
        norm = inner.norm
        # The final norm on the kernels when it is the Llama-family formula, else the module itself.
        self.norm = rms_params(norm) if type(norm).__name__ in NORMS + MLA_NORMS and norm.weight.dtype == dtype \
            else None
        self.norm_module = norm

    def masks(self, attention_mask) -> list | None:
        """Each layer's mask from what generate prepared, or None where the model must make it itself."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
            return [attention_mask] * len(self.fused)
        if isinstance(attention_mask, dict) and self.layer_types is not None \
                and all(t in attention_mask for t in self.layer_types):
            return [attention_mask[t] for t in self.layer_types]
        return None

    def forward(self, input_ids: torch.Tensor, masks: list, position_ids, cache, logits_to_keep):
        hidden = self.embed(input_ids)
        if position_ids is None:
            position_ids = (torch.arange(hidden.shape[1]) + cache.get_seq_length())[None]
        embeddings = self.rotary(hidden, position_ids=position_ids)
        for fused, mask in zip(self.fused, masks):
            hidden = fused.decode(hidden, mask, cache, embeddings, {})
        if self.norm is not None:
            hidden = self.backend.compute_rms_norm(hidden[0], *self.norm)[None]
        else:
            hidden = self.norm_module(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.output(logits=self.lm_head(hidden[:, keep, :]), **{self.cache_field: cache})


def fuse_decode_model(model: torch.nn.Module, fused_names: list[str], backend, dtype: torch.dtype) -> bool:
    """Give `model` (a causal LM) the fused decode forward when its base model is one of MODELS, all its
    decoder layers are fused (`fused_names`, as fuse_decode_layers returned them) and its LM head is on
    the kernels; returns whether it did."""
    inner = getattr(model, "model", None)
    if type(inner).__name__ not in MODELS or not isinstance(getattr(model, "lm_head", None), MoetierLinear):
        return False
    layers = inner.layers[: inner.config.num_hidden_layers]
    if fused_names != [f"model.layers.{i}" for i in range(len(layers))]:
        return False
    step = FusedModelDecode(model, [layer.forward.fused for layer in layers], backend, dtype)
    original = model.forward

    # The original's signature stays visible: generate inspects it (with logits_to_keep there, a prefill
    # computes the LM head on its last token only, not on all of them).
    @functools.wraps(original)
    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        masks = None
        if not args and isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.shape[0] == 1 \
                and ids.shape[1] <= DECODE_TOKENS and cache is not None and not torch.is_grad_enabled() \
                and ids.device.type == "cpu" \
                and all(k in TAKEN or (k in NEUTRAL and v in NEUTRAL[k]) or (k not in NEUTRAL and v is None)
                        for k, v in kwargs.items()):
            masks = step.masks(kwargs.get("attention_mask"))
        if masks is None:
            return original(*args, **kwargs)
        return step.forward(ids, masks, kwargs.get("position_ids"), cache, kwargs.get("logits_to_keep", 0))

    forward.fused = step
    model.forward = forward
    return True
