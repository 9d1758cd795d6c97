"""transformers' attention on a moetier CPU backend's decode-attention kernels (moetier.attention).

Registered in transformers' AttentionInterface (and its mask interface, with sdpa's boolean masks) as
"moetier", with SDPA's conventions: where transformers passes no mask with the causal flag, new token t
sees keys 0..t. Decode forwards (at most DECODE_TOKENS new tokens, on the CPU, in a dtype the backend takes)
run `backend.decode_attention` over the cache transformers hands in; everything else (prefill, a GPU,
attention sinks, soft-capping, position biases, dropout while training) goes to transformers' sdpa
function, as the model would have run it. Sparse attention's key selection (DeepSeek-V3.2 and GLM-5 hand
`indices` to any implementation but eager and sdpa) becomes the mask those two would have got. Modules
whose forward does not go through the interface (absorbed MLA decode, moetier.integrations.transformers.mla)
are not touched.
"""
from __future__ import annotations

import torch

from ...errors import SettingError
from .dense import DECODE_TOKENS

NAME = "moetier"
BACKEND_ATTR = "_moetier_attention_backend"
# What sdpa_attention_forward takes that these kernels do not compute: a call carrying one goes to sdpa.
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "head_mask")


def register() -> None:
    """Make "moetier" an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def check_name(attn_implementation: str | None) -> None:
    """A SettingError for a name neither moetier nor transformers implements, before anything loads."""
    from transformers import AttentionInterface

    known = sorted({NAME, "eager", *AttentionInterface._global_mapping})
    if attn_implementation is not None and attn_implementation not in known:
        raise SettingError(f"unknown attention implementation {attn_implementation!r}; known: {', '.join(known)}")


def choose_attention_backend(backends, dtype: torch.dtype, attn_implementation: str | None, loaded_with: str):
    """The CPU backend (of those computing the experts) whose kernels take the decode attention, or None
    to leave transformers' choice. attn_implementation None: the first CPU backend that computes attention
    in `dtype`, else none; "moetier": that backend, an error when there is none; another name: none.
    Only a model transformers runs on sdpa (`loaded_with`) is taken over, since sdpa is where everything
    the kernels do not compute goes: a model on eager (gpt-oss's attention sinks, which sdpa lacks) stays."""
    if attn_implementation not in (None, NAME):
        return None
    if loaded_with != "sdpa":
        if attn_implementation == NAME:
            raise SettingError(f"attention implementation '{NAME}' takes over sdpa attention; transformers runs this "
                               f"model's on {loaded_with}; leave it unset")
        return None
    for b in backends:
        if b.device.type == "cpu" and dtype in b.attention_dtypes:
            return b
    if attn_implementation == NAME:
        names = ", ".join(b.name for b in backends if b.device.type == "cpu") or "no CPU backend"
        raise SettingError(f"attention implementation '{NAME}' needs a CPU backend that computes attention in "
                           f"{str(dtype).removeprefix('torch.')}; this model's: {names}; leave it unset or name one "
                           f"of transformers' (sdpa, eager)")
    return None


def route_attention(model: torch.nn.Module, backend) -> list[str]:
    """Give every attention module of `model` the backend, and the model the "moetier" implementation;
    returns the modules' names."""
    register()
    names = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "config"):
            setattr(module, BACKEND_ATTR, backend)
            names.append(name)
    if names:
        model.set_attn_implementation(NAME)
    return names


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function signature: q [B, Hq, T, D], k / v [B, Hkv, S, D] ->
    ([B, T, Hq, Dv], None)."""
    backend = getattr(module, BACKEND_ATTR, None)
    indices = kwargs.pop("indices", None)
    if indices is not None:  # sparse attention's selection (DeepSeek-V3.2, GLM-5): as a mask
        attention_mask = _selected_keys_mask(attention_mask, indices, key.shape[2], query.dtype)
    if backend is None or query.shape[2] > DECODE_TOKENS or query.device.type != "cpu" \
            or query.dtype not in backend.attention_dtypes or (dropout and module.training) \
            or kwargs.get("output_attentions") or any(kwargs.get(k) is not None for k in UNSUPPORTED_KWARGS):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    T, S = query.shape[2], key.shape[2]
    if attention_mask is None and is_causal and T > 1:
        # transformers leaves the mask out only where SDPA's is_causal means it: token t sees keys 0..t
        # (aligned at the start: a first forward over a static cache, whose later slots are empty).
        attention_mask = (torch.arange(S)[None, :] <= torch.arange(T)[:, None])[None, None]
    return backend.decode_attention(query, key, value, scale=scale, mask=attention_mask), None


def _selected_keys_mask(attention_mask, indices: torch.Tensor, keys: int, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask restricted to the keys `indices` [B, T, top-k] selects, as the DSA models' own eager
    and sdpa branches build it (bool: and-ed; additive: the dtype's minimum elsewhere)."""
    B, T = indices.shape[:2]
    selected = torch.zeros(B, T, keys, dtype=torch.bool, device=indices.device)
    selected.scatter_(-1, indices.long(), True)
    selected = selected.unsqueeze(1)
    if attention_mask is None:
        return selected
    attention_mask = attention_mask[..., :keys]
    if attention_mask.dtype == torch.bool:
        return attention_mask & selected
    return attention_mask.masked_fill(~selected, torch.finfo(dtype).min)
