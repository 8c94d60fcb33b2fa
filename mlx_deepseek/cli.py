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


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def _sampling(a: argparse.Namespace):
    from .generate import Sampling

    return Sampling(a.temp, a.top_p, a.top_k, a.min_p, a.repetition_penalty, a.seed)


def cmd_generate(a: argparse.Namespace) -> int:
    from . import load
    from .chat import apply_chat_template
    from .generate import stream_generate

    model, tokenizer = load(a.model, dtype=a.dtype)
    if a.raw:
        prompt = a.prompt
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
        prompt = apply_chat_template(tokenizer, messages, model.args.model_type, a.template)
    stream = stream_generate(
        model, tokenizer, prompt, max_tokens=a.max_tokens, sampling=_sampling(a), stop=a.stop or (),
        mtp=a.mtp, trace=a.json, kv_bits=a.kv_bits,
    )
    in_reasoning = False
    for chunk in stream:
        if not a.json:
            if chunk.reasoning and not in_reasoning:
                print("<think>", flush=True)
                in_reasoning = True
            print(chunk.reasoning, end="", flush=True)
            if chunk.answer and in_reasoning:
                print("\n</think>\n", flush=True)
                in_reasoning = False
            print(chunk.answer, end="", flush=True)
        result = chunk.result
    if a.json:
        out = result.to_dict()
        trace = out.pop("expert_trace")
        out["experts"] = trace
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print()
    line = (
        f"prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.1f} tok/s | generation: "
        f"{result.generation_tokens} tokens, {result.generation_tps:.1f} tok/s | peak memory {result.peak_memory_gb:.3f} GB"
    )
    if result.mtp_acceptance is not None:
        line += f" | MTP acceptance {result.mtp_acceptance:.0%}"
    print(line, file=sys.stderr)
    return 0


def cmd_bench_generate(a: argparse.Namespace) -> int:
    from .bench import bench_generate, format_generate

    r = bench_generate(a.model, a.prompt_tokens, a.gen_tokens, a.layers, a.scale, a.bits or None, a.trials)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(format_generate(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-deepseek", description="The DeepSeek model family in MLX.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a checkpoint is: family, parameters, dtype, KV-cache cost")
    info.add_argument("model", help="model folder or hub id")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate an answer (reasoning and answer shown apart)")
    gen.add_argument("--model", default=None, help="model folder or hub id (default: the bundled nano-r1)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--max-tokens", type=int, default=256)
    _sampling_args(gen)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--mtp", action="store_true", help="MTP self-speculative decoding")
    gen.add_argument("--kv-bits", type=int, default=None, choices=(4, 8), help="quantize the KV cache")
    gen.add_argument("--template", default=None, choices=("r1", "v3", "v2", "v1"), help="built-in chat template")
    gen.add_argument("--raw", action="store_true", help="use the prompt as is, without a chat template")
    gen.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    gen.add_argument("--json", action="store_true", help="print one JSON object (with the expert statistics)")
    gen.set_defaults(func=cmd_generate)

    # `bench X`: each benchmark registers a sub-parser here (measured side by side with mlx-lm).
    bench = sub.add_parser("bench", help="measure this project against mlx-lm on the same checkpoint")
    benches = bench.add_subparsers(dest="bench", required=True)
    bg = benches.add_parser("generate", help="prefill/decode tokens/s vs mlx-lm (plain and MTP)")
    bg.add_argument("--model", default=None, help="a checkpoint both load (default: a random V2-Lite-shaped one)")
    bg.add_argument("--prompt-tokens", type=int, default=128)
    bg.add_argument("--gen-tokens", type=int, default=128)
    bg.add_argument("--layers", type=int, default=8, help="layers of the random checkpoint")
    bg.add_argument("--scale", type=float, default=1.0, help="width scale of the random checkpoint")
    bg.add_argument("--bits", type=int, default=4, help="quantization of the random checkpoint (0: bfloat16)")
    bg.add_argument("--trials", type=int, default=3)
    bg.add_argument("--json", action="store_true")
    bg.set_defaults(func=cmd_bench_generate)
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
