"""`moetier stats record`: run a model over a text file and count, per MoE layer and expert, how often the
routers chose each expert (moetier.placement's ActivationStats), for placement (`moetier plan --stats`)."""
from __future__ import annotations

import sys

from ..errors import SettingError
from .options import check_writable, positive_int
from .run import add_model_options, format_bytes, load_model, load_tokenizer, resolve_model


def register(sub) -> None:
    p = sub.add_parser("stats", help="activation statistics of a model's routers, for placement")
    ssub = p.add_subparsers(dest="stats_command", required=True, metavar="STATS_COMMAND")
    q = ssub.add_parser("record", help="run a model over a text file and record which experts its routers choose",
                        description=__doc__.split("\n\n")[0])
    add_model_options(q)
    q.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to run the model over")
    q.add_argument("--out", required=True, metavar="STATS", help="statistics file to write (safetensors)")
    q.add_argument("--context", type=positive_int, default=512, metavar="N",
                   help="tokens per forward pass: the text is cut into pieces of N tokens (default 512)")
    q.add_argument("--max-tokens", type=positive_int, metavar="N", help="stop after the first N tokens of the text")
    q.set_defaults(func=run_record)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise SettingError(f"--text {path}: no such file") from None
    except IsADirectoryError:
        raise SettingError(f"--text {path} is a folder; give a text file") from None
    except UnicodeDecodeError as exc:
        raise SettingError(f"--text {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SettingError(f"--text {path}: cannot read it: {exc.strerror}") from None
    if not text.strip():
        raise SettingError(f"--text {path} is empty; give some text to run the model over")
    return text


def run_record(args) -> int:
    import torch

    from ..placement.stats import ActivationStats

    out = check_writable(args.out, "statistics file")
    text = _read_text(args.text)
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder, args.model, args.tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    model, backend = load_model(args, folder)
    try:
        layout = model.moetier_layout
        sizes = {m.experts.num_experts for m in layout.moe_layers}
        if len(sizes) != 1:
            raise SettingError(f"the MoE layers of {args.model} have different expert counts {sorted(sizes)}; "
                               "activation statistics need one count for all layers")
        stats = ActivationStats(layout.moe_layer_indices, sizes.pop(), source=str(args.text))
        model.moetier_experts.set_recorder(stats)
        with torch.inference_mode():
            for start in range(0, len(ids), args.context):
                piece = torch.tensor([ids[start:start + args.context]], device=model.device)
                model(input_ids=piece, use_cache=False)
        model.moetier_experts.set_recorder(None)
    finally:
        model.moetier_experts.close()
    stats.save(out)
    tokens = int(stats.tokens[0]) if len(stats.layers) else 0
    shares = stats.shares()
    top = shares.max(dim=1).values
    print(f"recorded {tokens} tokens through {len(stats.layers)} MoE layers x {stats.num_experts} experts "
          f"({backend}) to {args.out} ({format_bytes(out.stat().st_size)})")
    print(f"  hottest expert per layer takes {float(top.min()):.1%} to {float(top.max()):.1%} of the layer's choices "
          f"(uniform: {1 / stats.num_experts:.1%})", file=sys.stdout)
    return 0
