"""Generation with timings: prefill (prompt to first new token) and decode (the tokens after it), measured
from the tokens transformers hands its streamer, so one streamed run gives both rates."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationTimes:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # from the call to the first new token: the prompt's forward (and the first sampling)
    decode_s: float  # from the first new token to the last

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else math.nan

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else math.nan


def _clock(inner):
    """A transformers streamer that notes when each new token arrives and passes everything to `inner`."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False
            self.first = self.last = None
            self.count = 0

        def put(self, value):
            if not self.prompt_seen:  # generate() hands the prompt first
                self.prompt_seen = True
            else:
                now = time.perf_counter()
                self.first = now if self.first is None else self.first
                self.last = now
                self.count += int(value.numel())
            if inner is not None:
                inner.put(value)

        def end(self):
            if inner is not None:
                inner.end()

    return Clock()


def _static_cache_is_safe(model) -> bool:
    """Whether generation may use a static cache: the model's generation config names no cache, transformers
    marks the model as working with static caches, and it has no sparse-attention indexer (DeepSeek-V3.2,
    GLM-5: over a static cache's empty slots transformers' indexer selects other keys; measured different
    greedy tokens from the seventh on, with transformers' own sdpa attention too)."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    return (model.generation_config.cache_implementation is None and getattr(model, "_can_compile_fullgraph", False)
            and getattr(config, "index_topk", None) is None)


# Generation settings that make transformers' greedy search more than an argmax (logits processors,
# stopping criteria, beams): with any of them away from its default, generate runs as transformers'.
_GREEDY_SETTINGS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                    "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
                    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
                    "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale",
                    "watermarking_config", "stop_strings", "max_time", "num_beams", "num_beam_groups",
                    "force_words_ids", "constraints", "low_memory", "penalty_alpha", "dola_layers",
                    "assistant_model", "prompt_lookup_num_tokens")


def _own_greedy_loop(model) -> bool:
    """Whether greedy generation may run moetier's own loop over the fused model forward (decode_model):
    transformers' greedy search would be an argmax per step over a static cache with full attention."""
    from transformers import GenerationConfig

    if not getattr(model, "moetier_fused_model", False) or not _static_cache_is_safe(model):
        return False
    config = model.config.get_text_config()
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    defaults, settings = GenerationConfig(), model.generation_config
    return all(getattr(settings, name, None) == getattr(defaults, name, None) for name in _GREEDY_SETTINGS)


def _greedy(model, input_ids: torch.Tensor, max_new_tokens: int, streamer, eos_token_id) -> torch.Tensor:
    """transformers' greedy search over a static cache, made by moetier: the prompt through the model's
    forward, each new token through its fused decode forward with the causal mask over the cache (what
    generate prepares for it), the argmax of the fp32 logits, until max_new_tokens or an end token."""
    import inspect

    from transformers import StaticCache

    T = input_ids.shape[1]
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=T + max_new_tokens)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    eos = set() if eos is None else {int(e) for e in ([eos] if isinstance(eos, int) else eos)}
    slots = torch.arange(T + max_new_tokens)[None, None, None]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    new = []
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True, logits_to_keep=1,
                **{name: cache})
    for step in range(max_new_tokens):
        token = out.logits[:, -1, :].to(dtype=torch.float32).argmax(dim=-1)
        new.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if int(token) in eos or step + 1 == max_new_tokens:
            break
        out = model(input_ids=token[:, None], attention_mask=slots <= T + step, use_cache=True, **{name: cache})
    if streamer is not None:
        streamer.end()
    return torch.cat(new)


def generate(model, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0,
             seed: int | None = None, streamer=None, attention_mask: torch.Tensor | None = None,
             eos_token_id=None, pad_token_id=None) -> tuple[torch.Tensor, GenerationTimes]:
    """Greedy (temperature 0) or sampled generation of one sequence; returns (new token ids [n], times).
    `streamer` (e.g. transformers' TextStreamer) receives the tokens as they come. A model transformers
    marks as working with static caches gets one (see _static_cache_is_safe)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {list(input_ids.shape)}")
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                  attention_mask=attention_mask.to(device))
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=None, top_p=None)
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    if _static_cache_is_safe(model):
        # A cache of the final length up front: a dynamic cache concatenates every layer's keys and values
        # at every step (measured 14.0 against 11.5 ms per decode step on Qwen3-30B-A3B's dimensions).
        kwargs["cache_implementation"] = "static"
    clock = _clock(streamer)
    start = time.perf_counter()
    with torch.inference_mode():
        if temperature <= 0 and max_new_tokens > 0 and attention_mask.all() and _own_greedy_loop(model):
            # transformers' generate costs ~0.6 ms a step beside the fused forward (inputs, masks, stopping
            # criteria): a quarter of the default model's step
            new = _greedy(model, input_ids, max_new_tokens, clock, eos_token_id).cpu()
        else:
            out = model.generate(input_ids, streamer=clock, **kwargs)
            new = out[0, input_ids.shape[1]:].cpu()
    first = clock.first if clock.first is not None else time.perf_counter()
    last = clock.last if clock.last is not None else first
    return new, GenerationTimes(int(input_ids.shape[1]), int(new.numel()), first - start, last - first)
