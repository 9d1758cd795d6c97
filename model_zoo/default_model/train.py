"""Train the default model: a small Qwen3-MoE language model on the Python standard library's sources.

    python -m moetier.model_zoo.default_model.train --out DIR            # the shipped model (about 15 min, 2 cores)
    python -m moetier.model_zoo.default_model.train --out DIR --preset smoke   # seconds: the test's run

Steps: train the byte-level BPE tokenizer on the training split, tokenize both splits (files joined by the
end-of-text token), cut the training stream into non-overlapping windows visited in a seeded random order,
train transformers' `Qwen3MoeForCausalLM` in fp32 with AdamW (warmup, cosine decay) and transformers' own
router load-balancing loss (per layer), and save the model in bf16 with `save_pretrained` (the per-expert on-disk
layout of the Qwen3-MoE releases) next to the tokenizer and `train_log.json` (the loss curve).
Everything is seeded; the same thread count on the same machine and library versions gives the same bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import corpus
from .tokenizer import END_OF_TEXT, VOCAB_SIZE, to_transformers, train_tokenizer


@dataclass(frozen=True)
class ModelSpec:
    """The architecture: Qwen3-MoE with every layer sparse, softmax top-k routing renormalized over the k
    (as Qwen3-30B-A3B), tied input and output embeddings (what keeps a 4096-token vocabulary to 1M
    parameters)."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    num_experts: int = 32
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 64
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = 512
    # Weight of transformers' load-balancing loss, taken per layer and averaged (see `router_loss`): modest
    # enough to leave loads unequal, strong enough that no expert dies (see docs/default-model.md).
    router_aux_loss_coef: float = 0.003

    def hf_config(self, eos_token_id: int):
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, intermediate_size=4 * self.hidden_size,  # unused: no dense layers
            moe_intermediate_size=self.moe_intermediate_size, num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=True,
            router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False,
            bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=eos_token_id)


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    eval_every: int = 100
    eval_windows: int = 32  # held-out windows of seq_len tokens, evenly spaced over the held-out split
    max_files: int | None = None  # only the first N files of each split (the smoke preset)


PRESETS: dict[str, tuple[ModelSpec, TrainSpec]] = {
    "default": (ModelSpec(), TrainSpec()),
    "smoke": (ModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=512,
                        max_position_embeddings=64),
              # one thread: on a busy 2-core machine a second spinning thread makes tiny steps 20x slower
              TrainSpec(steps=40, batch_size=8, seq_len=64, lr=5e-3, warmup_steps=5, log_every=5, eval_every=20,
                        eval_windows=8, max_files=20, threads=1)),
}


@dataclass(frozen=True)
class CurvePoint:
    step: int
    tokens: int
    train_loss: float  # mean language-model loss (router loss excluded) over the steps since the last point
    heldout_loss: float | None
    elapsed_s: float


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    curve: tuple[CurvePoint, ...]
    step_losses: tuple[float, ...]  # language-model loss of every step
    tokens_seen: int
    wall_s: float
    train_s: float


def token_stream(tok, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one int64 token stream, each followed by the end-of-text token."""
    eos = tok.token_to_id(END_OF_TEXT)
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [N, seq_len] windows of the stream (the tail shorter than seq_len is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def spaced(rows: torch.Tensor, count: int | None) -> torch.Tensor:
    """`count` rows evenly spaced over `rows` (all of them when count is None or too large), so a sample
    covers every part of the split rather than its alphabetically first files."""
    if count is None or count >= rows.shape[0]:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, count).round().long()]


def lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting ids[:, 1:] from logits[:, :-1]."""
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1))


def router_loss(router_logits: Sequence[torch.Tensor], config) -> torch.Tensor:
    """transformers' Switch-style load-balancing loss, per layer, averaged over layers (k when balanced).

    transformers' own call pools the token counts of all layers, which leaves a layer free to collapse onto
    a few experts while the others make up the average; training frameworks balance each layer, as here."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    E, k = config.num_experts, config.num_experts_per_tok
    per_layer = [load_balancing_loss_func((lg,), E, k) for lg in router_logits]
    return torch.stack(per_layer).mean()


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) of the model over the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i:i + batch_size]
        total += next_token_loss(model(input_ids=batch).logits, batch).item() * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def train(out_dir: str | os.PathLike, model_spec: ModelSpec, spec: TrainSpec, *,
          log: Callable[[str], None] = print, command: str | None = None) -> TrainResult:
    """Train from scratch and save the checkpoint and tokenizer into out_dir (created if needed)."""
    from transformers import Qwen3MoeForCausalLM

    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()
    torch.set_num_threads(spec.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    train_files = corpus.source_files("train")[: spec.max_files]
    train_texts = [t for t in (f.read() for f in train_files) if t]
    heldout_texts = [t for t in (f.read() for f in corpus.source_files("heldout")[: spec.max_files]) if t]
    tok = train_tokenizer(train_texts, model_spec.vocab_size)
    train_rows = windows(token_stream(tok, train_texts), spec.seq_len)
    heldout_rows = spaced(windows(token_stream(tok, heldout_texts), spec.seq_len), spec.eval_windows)
    log(f"corpus: {len(train_texts)} training files -> {train_rows.numel()} tokens in {train_rows.shape[0]} windows; "
        f"held-out sample {heldout_rows.numel()} tokens ({time.perf_counter() - t_start:.1f} s)")

    torch.manual_seed(spec.seed)
    config = model_spec.hf_config(eos_token_id=tok.token_to_id(END_OF_TEXT))
    model = Qwen3MoeForCausalLM(config)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95), eps=1e-8)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model_spec.num_experts} experts "
        f"top-{model_spec.num_experts_per_tok}, {model_spec.num_hidden_layers} layers, vocab {model_spec.vocab_size}")

    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.empty(0, dtype=torch.int64)
    step_losses: list[float] = []
    curve: list[CurvePoint] = []
    tokens = 0
    t_train = time.perf_counter()

    def point(step: int, with_eval: bool) -> None:
        since = step_losses[curve[-1].step if curve else 0:]
        held = mean_loss(model, heldout_rows, spec.batch_size) if with_eval else None
        curve.append(CurvePoint(step, tokens, sum(since) / len(since), held, time.perf_counter() - t_train))
        log(f"step {step:5d}  tokens {tokens:9d}  train {curve[-1].train_loss:.4f}"
            + (f"  held-out {held:.4f}" if held is not None else "") + f"  {curve[-1].elapsed_s:7.1f} s")

    for step in range(spec.steps):
        if order.numel() < spec.batch_size:  # a fresh seeded permutation of the windows each epoch
            order = torch.cat([order, torch.randperm(train_rows.shape[0], generator=gen)])
        batch, order = train_rows[order[: spec.batch_size]], order[spec.batch_size:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        outputs = model(input_ids=batch, output_router_logits=True)
        lm_loss = next_token_loss(outputs.logits, batch)
        (lm_loss + config.router_aux_loss_coef * router_loss(outputs.router_logits, config)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
        step_losses.append(lm_loss.item())
        done = step + 1
        if done % spec.eval_every == 0 or done == spec.steps:
            point(done, with_eval=True)
        elif done % spec.log_every == 0:
            point(done, with_eval=False)
    train_s = time.perf_counter() - t_train

    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = config.eos_token_id
    model.to(torch.bfloat16).save_pretrained(out)
    release_config_keys(out)
    to_transformers(tok, model_spec.max_position_embeddings).save_pretrained(out)
    wall_s = time.perf_counter() - t_start
    result = TrainResult(out, tuple(curve), tuple(step_losses), tokens, wall_s, train_s)
    (out / "train_log.json").write_text(json.dumps({
        "command": command, "model": asdict(model_spec), "train": asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()), "tokens_seen": tokens,
        "train_tokens_available": train_rows.numel(), "wall_s": round(wall_s, 1), "train_s": round(train_s, 1),
        "cpu_s": round(time.process_time() - cpu_start, 1),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "threads": spec.threads, "versions": _versions(),
        "curve": [asdict(p) for p in curve]}, indent=1) + "\n", encoding="utf-8")
    log(f"saved {out} in {wall_s:.0f} s ({train_s:.0f} s training, {tokens} tokens)")
    return result


def release_config_keys(folder: Path) -> None:
    """Name config.json's keys as the Qwen3-MoE releases do: transformers 5 writes its internal
    `num_local_experts`, the releases (and tools that read them) say `num_experts`; transformers reads both."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moetier.model_zoo.default_model.train",
                                description="Train the default model on the Python standard library's sources.")
    p.add_argument("--out", required=True, help="folder to write the checkpoint and tokenizer to")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="default: the shipped model; smoke: a tiny model in seconds")
    p.add_argument("--steps", type=int, help="override the preset's number of optimizer steps")
    p.add_argument("--threads", type=int, help="torch threads (default 2)")
    args = p.parse_args(argv)
    model_spec, spec = PRESETS[args.preset]
    if args.steps is not None:
        if args.steps < 1:
            p.error("--steps must be at least 1")
        spec = replace(spec, steps=args.steps)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be at least 1")
        spec = replace(spec, threads=args.threads)
    command = "python -m moetier.model_zoo.default_model.train " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    train(args.out, model_spec, spec, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
