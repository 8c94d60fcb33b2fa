"""Benchmarks, measured side by side with mlx-lm on the same checkpoint in one process."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .models import Model
from .weights import save_model

# DeepSeek-V2-Lite's widths (deepseek-ai/DeepSeek-V2-Lite config.json); the layer count and a width
# scale make it fit the machine. Written as deepseek_v3 (sigmoid, aux-loss-free routing, one MTP module),
# which mlx-lm runs with the same absorbed-MLA latent cache as this project.
V2_LITE_SHAPE = dict(
    model_type="deepseek_v3", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
    n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", scoring_func="sigmoid",
    n_group=1, topk_group=1, norm_topk_prob=True, first_k_dense_replace=1, rms_norm_eps=1e-6,
    max_position_embeddings=163840, rope_theta=10000.0, num_nextn_predict_layers=1, tie_word_embeddings=False,
)


def random_checkpoint(folder: Path, layers: int = 8, scale: float = 1.0, bits: Optional[int] = 4,
                      group_size: int = 64, seed: int = 0) -> Path:
    """A random-weight checkpoint of the V2-Lite shape in the MLX layout (quantized when `bits`)."""
    config = dict(V2_LITE_SHAPE, num_hidden_layers=layers)
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "kv_lora_rank"):
        config[key] = max(64, int(config[key] * scale) // 64 * 64)
    config["num_attention_heads"] = config["num_key_value_heads"] = max(2, int(16 * scale))
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    for _, m in model.named_modules():  # a router that spreads tokens over the experts
        if hasattr(m, "e_score_correction_bias"):
            m.weight = mx.random.normal(m.weight.shape) / math.sqrt(m.weight.shape[-1])
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
        config["quantization"] = {"group_size": group_size, "bits": bits}
    elif mx.default_device() != mx.cpu:  # unquantized: bfloat16 (the CPU's gather_mm needs float32)
        model.load_weights([
            (k, v if k.endswith("e_score_correction_bias") else v.astype(mx.bfloat16))
            for k, v in tree_flatten(model.parameters())
        ])
        config["torch_dtype"] = "bfloat16"
    mx.eval(model.parameters())
    save_model(model, folder, config)
    return folder


def memory_bandwidth(gb: float = 1.0) -> float:
    """Bytes/s of a large elementwise pass (read + write), best of five."""
    x = mx.random.uniform(shape=(int(gb * 2**30 / 4),))
    mx.eval(x)
    best = math.inf
    for _ in range(5):
        tic = time.perf_counter()
        mx.eval(x + 1.0)
        best = min(best, time.perf_counter() - tic)
    return 2 * x.nbytes / best


def bytes_per_decode_token(model: Model, context: int) -> int:
    """Weights a batch-1 decode step reads (idle routed experts skipped) plus the KV cache it attends over."""
    args = model.args
    total = 0
    for name, p in tree_flatten(model.parameters()):
        if name.startswith("mtp."):
            continue
        share = args.num_experts_per_tok / args.n_routed_experts if ".switch_mlp." in name else 1.0
        if "embed_tokens" in name:
            share = 1.0 / args.vocab_size  # a row lookup (tied heads read it all through lm_head)
        total += int(p.nbytes * share)
    return total + args.kv_cache_bytes_per_token(2) * context


def _time_tokens(steps, n: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the next n - 1 tokens) of a token iterator."""
    tic = time.perf_counter()
    got = 0
    first = 0.0
    for new in steps:
        got += len(new) if isinstance(new, list) else 1
        if not first:
            first = time.perf_counter() - tic
            tic = time.perf_counter()
        if got >= n:
            break
    return first, (time.perf_counter() - tic) * (n - 1) / max(got - 1, 1)


def bench_generate(model_path: Optional[str] = None, prompt_tokens: int = 128, gen_tokens: int = 128,
                   layers: int = 8, scale: float = 1.0, bits: Optional[int] = 4, trials: int = 3) -> dict:
    """Prefill and decode tokens/s of this project (plain and MTP) and of mlx-lm's generate_step: the best of
    `trials` interleaved runs each, and the median over trials of each trial's decode ratio to mlx-lm."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from .generate import generate_tokens
    from .loading import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = model_path or str(random_checkpoint(Path(tmp) / "bench", layers=layers, scale=scale, bits=bits))
        ours = load_model(path)
        theirs, _ = mlx_lm_load_model(Path(path))
        prompt = mx.random.randint(3, ours.args.vocab_size - 1, (prompt_tokens,)).tolist()
        runs = {
            "mlx-lm": lambda: (int(t) for t, _ in generate_step(mx.array(prompt), theirs, max_tokens=gen_tokens + 1)),
            "mlx-deepseek": lambda: generate_tokens(ours, prompt),
        }
        if ours.mtp:
            runs["mlx-deepseek --mtp"] = lambda: _mtp_run(ours, prompt, stats)
        stats: dict = {}
        rows: dict = {name: {"prefill_tps": 0.0} for name in runs}
        rounds: dict = {name: [] for name in runs}  # each trial's decode tok/s
        for name, make in runs.items():  # warm-up: compilation and first-use allocations
            _time_tokens(make(), 4)
        for _ in range(trials):  # interleaved, best of `trials` for each
            for name, make in runs.items():
                stats.update(drafted=0, accepted=0)
                first, rest = _time_tokens(make(), gen_tokens)
                row = rows[name]
                row["prefill_tps"] = max(row["prefill_tps"], prompt_tokens / first)
                rounds[name].append((gen_tokens - 1) / rest)
                if name.endswith("--mtp"):
                    row["mtp_acceptance"] = stats["accepted"] / max(stats["drafted"], 1)
        bandwidth = memory_bandwidth()
        per_token = bytes_per_decode_token(ours, prompt_tokens + gen_tokens // 2)
        bound = bandwidth / per_token
        for name, row in rows.items():
            row["decode_tps"] = max(rounds[name])
        base = rows["mlx-lm"]
        for name, row in rows.items():  # the median: a slow spell of the host lands on one trial of every engine
            row["decode_ratio"] = row["decode_tps"] / base["decode_tps"]
            row["decode_ratio_median"] = statistics.median(x / y for x, y in zip(rounds[name], rounds["mlx-lm"]))
            row["prefill_ratio"] = row["prefill_tps"] / base["prefill_tps"]
            row["bandwidth_bound_fraction"] = row["decode_tps"] / bound
        return {
            "model": model_path or f"random V2-Lite shape, {layers} layers, width x{scale}, "
            + (f"{bits}-bit" if bits else "unquantized"),
            "device": str(mx.default_device()), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
            "memory_bandwidth_gbs": bandwidth / 1e9, "bytes_per_decode_token": per_token,
            "bandwidth_bound_tps": bound, "results": rows,
        }


def _mtp_run(model, prompt, stats):
    from .generate import generate_tokens

    return generate_tokens(model, prompt, mtp=True, stats=stats)


def format_generate(r: dict) -> str:
    lines = [
        f"model: {r['model']}; device: {r['device']}; prompt {r['prompt_tokens']} tokens, {r['gen_tokens']} generated; "
        f"memory bandwidth {r['memory_bandwidth_gbs']:.0f} GB/s; {r['bytes_per_decode_token'] / 1e6:.1f} MB read per "
        f"decode token -> bound {r['bandwidth_bound_tps']:.0f} tok/s",
        "",
        "| engine | prefill tok/s | decode tok/s | decode vs mlx-lm | decode vs mlx-lm, median of trials | "
        "prefill vs mlx-lm | of bandwidth bound | MTP acceptance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["results"].items():
        acc = f"{row['mtp_acceptance']:.0%}" if "mtp_acceptance" in row else "-"
        lines.append(
            f"| {name} | {row['prefill_tps']:.0f} | {row['decode_tps']:.1f} | {row['decode_ratio']:.2f}x | "
            f"{row['decode_ratio_median']:.2f}x | {row['prefill_ratio']:.2f}x | {row['bandwidth_bound_fraction']:.1%} | {acc} |"
        )
    return "\n".join(lines)
