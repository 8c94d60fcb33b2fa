"""`mlx-deepseek`: one command, with subcommands. Parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import sys


def _human(n: float, unit: str = "") -> str:
    """1234567 -> '1.235M'; parameter counts use B for 1e9, byte sizes GB."""
    for suffix in ("", "K", "M", "G" if unit else "B", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{suffix}{unit}"
        n /= 1000
    return f"{n:.4g}P{unit}"


def cmd_info(a: argparse.Namespace) -> int:
    from .info import describe
    from .loading import resolve

    d = describe(resolve(a.model))
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    rows = [
        ("model", d["path"]),
        ("family", f"{d['model_type']}: {d['family']}"),
        ("attention", f"{d['attention']}, {d['layers']} layers"),
        ("feed-forward", d["moe"]),
        ("parameters", f"{_human(d['parameters'])} total, {_human(d['active_parameters'])} active per token"
         + (f", MTP module {_human(d['mtp_parameters'])}" if d["mtp_parameters"] else "")),
        ("stored as", (", ".join(f"{k} x{v}" for k, v in d["dtypes"].items()) or "no weights")
         + f" ({_human(d['disk_bytes'], 'B')} on disk)"),
        ("quantization", d["quantization"]),
        ("KV cache", f"{_human(d['kv_cache_bytes_per_token'], 'B')} per token at {d['kv_cache_dtype_bytes']} bytes/value"
         + (f" (full per-head K/V would be {_human(d['mha_kv_cache_bytes_per_token'], 'B')})" if d["attention"] == "MLA" else "")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-deepseek", description="The DeepSeek model family in MLX.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a checkpoint is: family, parameters, dtype, KV-cache cost")
    info.add_argument("model", help="model folder or hub id")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    # `bench X`: each benchmark registers a sub-parser here (measured side by side with mlx-lm).
    bench = sub.add_parser("bench", help="measure this project against mlx-lm on the same checkpoint")
    bench.add_subparsers(dest="bench", required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, CheckpointError and bad paths
        print(f"mlx-deepseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
