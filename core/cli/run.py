"""`moetier run`: generate text with a model whose routed experts run on moetier, streaming the tokens as
they come, then the prefill and decode rates and where the experts lived.

The model runs through transformers' own modeling code (moetier.integrations.transformers); the generated
text goes to stdout, loading progress and the timings to stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SettingError
from .options import add_backend_options, load_context, named_model, positive_int

MODEL_HELP = ("checkpoint folder (config.json, safetensors and a tokenizer), its config.json, a GGUF file "
              "(llama.cpp's; qwen3moe or deepseek2), or `default` for the built-in default model (name a folder "
              "called default as ./default)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def size_arg(flag: str):
    """argparse type: a size such as 24GiB, in bytes (the placement package's parser)."""
    def parse(text: str) -> int:
        from ..placement.sizes import parse_size
        try:
            return parse_size(text, flag)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    return parse


def add_model_options(p: argparse.ArgumentParser) -> None:
    """What `run` and `stats record` share: the model, its dtype and device, and where its experts go."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--tokenizer", metavar="DIR",
                   help="folder with the model's tokenizer files (default: the checkpoint's own; for a GGUF file, "
                        "the tokenizer its metadata describes, where transformers can rebuild it)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="dtype of everything transformers holds: attention, dense layers, activations (default bf16)")
    p.add_argument("--device", metavar="DEV",
                   help="device of the dense layers, e.g. cpu or cuda:0 (default: the first GPU if any, else cpu)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads of the expert kernels and of the dense layers on the CPU (default: the "
                        "backend's and torch's, the physical cores)")
    p.add_argument("--format", metavar="FMT",
                   help="weight format of the experts, converted on load, e.g. int4_g64 (default: the checkpoint's; "
                        "a backend that does not compute it is an error)")
    p.add_argument("--dense-format", metavar="FMT",
                   help="format of the dense layers left on the CPU (attention, dense MLPs, LM head), computed "
                        "by the experts' CPU backend (default: the model's dtype, and a GGUF file's quantized "
                        "matrices in their own types; 'transformers': torch's own layers)")
    p.add_argument("--attention", metavar="IMPL",
                   help="attention implementation: 'moetier' (decode attention on the experts' CPU backend's "
                        "kernels; the default where that backend computes it), or one of transformers' "
                        "('sdpa', 'eager')")
    add_backend_options(p, backend_help="CPU backend of the experts (default: MOETIER_BACKEND, else the one "
                                        "`moetier doctor` chooses)")
    g = p.add_argument_group("placement (default: every expert in DRAM on the CPU backend)")
    g.add_argument("--plan", metavar="PLAN.json", help="where every expert goes, from `moetier plan --json`")
    g.add_argument("--gpu-mem", type=size_arg("--gpu-mem"), metavar="SIZE",
                   help="make a plan here: memory per accelerator for experts and dense parts, e.g. 24GiB (0: CPU only)")
    g.add_argument("--cpu-mem", type=size_arg("--cpu-mem"), metavar="SIZE",
                   help="make a plan here: DRAM moetier may use, e.g. 200GiB (default: each node's memory less 5%%)")
    g.add_argument("--disk", action="store_true",
                   help="make a plan here: leave the experts that do not fit in their files, read through a cache")
    g.add_argument("--disk-cache", type=size_arg("--disk-cache"), metavar="SIZE",
                   help="DRAM of the disk tier's cache (default: 10%% of the CPU budget)")
    g.add_argument("--strategy", metavar="NAME", help="placement strategy (default: cost with --stats, else uniform); "
                                                      "see `moetier plan --list-strategies`")
    g.add_argument("--stats", metavar="FILE", help="activation statistics for the strategy (`moetier stats record`)")


def resolve_model(name: str) -> Path:
    """The checkpoint MODEL names: `default` is the built-in model, anything else a folder, a config.json (its
    folder is returned) or a GGUF file (returned as it is)."""
    from ..checkpoint.gguf import is_gguf
    from ..integrations.transformers.loader import checkpoint_folder

    if is_gguf(named_model(name)):
        return Path(named_model(name))
    folder = checkpoint_folder(named_model(name))
    if not (folder / "config.json").is_file():
        raise SettingError(f"model {name}: {folder} has no config.json; name a checkpoint folder or its config.json")
    return folder


def load_tokenizer(folder: Path, name: str, tokenizer_dir: str | None = None):
    """transformers' tokenizer of the checkpoint (of `tokenizer_dir` when given; of a GGUF file, rebuilt from
    its metadata by transformers); a clear error when there is none or it cannot be read."""
    from transformers import AutoTokenizer

    from ..checkpoint.gguf import is_gguf

    gguf_file = folder if is_gguf(folder) else None
    if tokenizer_dir is not None:
        folder, what = Path(tokenizer_dir), f"--tokenizer {tokenizer_dir}"
        if not folder.is_dir():
            raise SettingError(f"{what}: no such folder")
    else:
        what = f"model {name}"
    if gguf_file is not None and tokenizer_dir is None:
        try:
            return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        except Exception as exc:  # transformers' GGUF tokenizer support: many error kinds, many unsupported files
            raise SettingError(f"{what}: transformers cannot rebuild the tokenizer from the GGUF metadata "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give the "
                               "folder of the model's tokenizer files with --tokenizer DIR") from None
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise SettingError(f"{what} has no tokenizer ({' / '.join(TOKENIZER_FILES)} in {folder}): text "
                           "cannot be turned into tokens; add the tokenizer files of the model's release")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, KeyError) for a bad tokenizer
        raise SettingError(f"{what}: cannot read its tokenizer: {type(exc).__name__}: {exc}") from None


def load_model(args, folder: Path, *, recorder=None):
    """moetier.load with the shared options: the CPU backend the user named (or selected), --format, dtype."""
    import torch

    from ..integrations.transformers import load

    ctx = load_context(args)
    if len(ctx.requested) > 1:
        raise SettingError(f"the experts run on one CPU backend; {len(ctx.requested)} were named: "
                           f"{', '.join(ctx.requested)}")
    budgets = dict(gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem, disk_cache=args.disk_cache, strategy=args.strategy,
                   stats=args.stats)
    flags = [f"--{k.replace('_', '-')}" for k, v in budgets.items() if v is not None] + (["--disk"] if args.disk else [])
    if args.plan and (flags or args.format or ctx.requested):
        given = flags + (["--format"] if args.format else []) + (["--backend"] if ctx.requested else [])
        raise SettingError(f"--plan already says where every expert goes and how: drop {', '.join(given)}")
    backend = ctx.requested[0] if ctx.requested else None
    if backend is None and not args.plan:
        backend = ctx.selection.for_device("cpu")
        if backend is None:
            raise SettingError("no CPU backend can run here (see `moetier doctor`)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load(folder, args.plan, dtype=dtype, device=args.device, threads=args.threads, backend=backend,
                 fmt=args.format, disk=args.disk, registry=ctx.registry, inventory=ctx.inventory,
                 dense_format=args.dense_format, attn_implementation=args.attention, **budgets)
    backends = sorted({s.backend.name for layer in model.moetier_experts.values() for s in layer.shards})
    return model, ", ".join(backends)


def register(sub) -> None:
    p = sub.add_parser("run", help="generate text with a model, its experts on moetier, and show how fast",
                       description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue (or the user message with --chat)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template as a user message")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="at most this many tokens are generated (default 64)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                   help="sampling temperature; 0 picks the most likely token every time (default 0)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampling (default 0)")
    p.set_defaults(func=run)


def encode(tokenizer, prompt: str, chat: bool, name: str):
    import torch

    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SettingError(f"--chat: the tokenizer of {name} has no chat template; run without --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    if not ids:
        raise SettingError("--prompt: the prompt turned into no tokens; give some text")
    return torch.tensor([ids], dtype=torch.long)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def run(args) -> int:
    from transformers import TextStreamer

    from ..integrations.transformers.generation import generate

    if not args.prompt.strip():
        raise SettingError("--prompt is empty; give the text to continue")
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder, args.model, args.tokenizer)
    model, backend = load_model(args, folder)
    try:
        input_ids = encode(tokenizer, args.prompt, args.chat, args.model)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        new, times = generate(model, input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=args.seed, streamer=streamer, pad_token_id=pad)
        sys.stdout.flush()
        experts = model.moetier_experts
        err = sys.stderr
        print(f"prefill  {times.prompt_tokens} tokens in {times.prefill_s:.3f} s: "
              f"{times.prefill_tokens_per_s:.1f} tokens/s", file=err)
        if times.new_tokens > 1:
            print(f"decode   {times.new_tokens - 1} tokens in {times.decode_s:.3f} s: "
                  f"{times.decode_tokens_per_s:.1f} tokens/s", file=err)
        else:
            print(f"decode   {times.new_tokens} token(s): too few to time", file=err)
        tiers = ", ".join(f"{tier} {format_bytes(n)}" for tier, n in sorted(experts.bytes_per_tier().items()) if n)
        dense = model.moetier_dense
        where = (f"{dense.matrices} dense matrices on {dense.backend} in {dense.fmt}" if dense.backend else
                 f"dense layers on {model.device} (torch)")
        where += (f"; attention on {model.moetier_attention}" if model.moetier_attention else
                  f"; attention {model.config._attn_implementation} (transformers)")
        if model.moetier_fused_decode:
            where += f"; {len(model.moetier_fused_decode)} decoder layers fused for decode"
            if model.moetier_fused_model:
                where += " (the model's wrapper too)"
        print(f"experts  {tiers or 'none'} ({backend}; {where}, {str(model.dtype).removeprefix('torch.')})",
              file=err)
    finally:
        model.moetier_experts.close()
    return 0
