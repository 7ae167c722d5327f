"""Model zoo CLI: `python -m train.models list [--seq-len N]` and `python -m train.models info NAME [--json]`.

Torch-free (registry only). Errors print `error: <message>` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from train.models.errors import ModelConfigError
from train.models.registry import REGISTRY, count_parameters, describe, flops_per_token, get_model_args


def _billions(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _experts(args) -> str:
    """'128 top-8 x768' (routed experts, experts per token, expert width); '-' for dense."""
    if not args.num_experts:
        return "-"
    return f"{args.num_experts} top-{args.num_experts_per_token} x{args.moe_intermediate_size}"


def list_table(seq_len: int | None = None) -> str:
    """Markdown table of every registered model (FLOPs at seq_len, default each model's max_seq_len capped at 2048)."""
    header = ["name", "family", "total", "non-embedding", "active", "GFLOPs/token", "seq", "layers",
              "heads", "kv heads", "head dim", "hidden", "ffn", "experts", "vocab", "tied"]
    rows = []
    for name, args in REGISTRY.items():
        seq = seq_len or min(args.max_seq_len, 2048)
        counts = count_parameters(args)
        rows.append([name, args.family, _billions(counts["total"]), _billions(counts["non_embedding"]),
                     _billions(counts["active"]), f"{flops_per_token(args, seq) / 1e9:.4g}", str(seq),
                     str(args.num_layers), str(args.num_heads), str(args.num_kv_heads), str(args.head_dim),
                     str(args.hidden_size), str(args.intermediate_size), _experts(args), str(args.vocab_size),
                     "yes" if args.tie_embeddings else "no"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    list_parser = commands.add_parser("list", help="table of the named sizes (Markdown)")
    list_parser.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs/token")
    info = commands.add_parser("info", help="one model's shape, parameters and FLOPs per token")
    info.add_argument("name")
    info.add_argument("--seq-len", type=int, default=None)
    info.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    try:
        if options.command == "list":
            print(list_table(options.seq_len))
            return 0
        details = describe(get_model_args(options.name), options.seq_len)
    except ModelConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(details, indent=2))
    else:
        params = details.pop("parameters")
        for key, value in details.items():
            print(f"{key:22s} {value}")
        for key, value in params.items():
            print(f"parameters.{key:11s} {value:,} ({_billions(value)})")
        print("flops formula          6*(N_non_embedding + V*D lm_head) + 12*L*H*Q*T (PaLM, fwd+bwd)"
              + ("; N counts active experts only" if details["num_experts"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
