"""What a checkpoint is, read from its config and file headers without loading any weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mlx.utils import tree_flatten

from .config import FAMILIES, ModelArgs
from .models import Model
from .weights import MTP_FILE, CheckpointError, read_header, weight_files

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}


def human(n: float, unit: str = "") -> str:
    """6519856 -> '6.52M'; parameter counts use B for 1e9, byte sizes a unit ('1.28KB', '4.997MB', '671GB')."""
    for suffix in ("", "K", "M", "G" if unit else "B", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{suffix}{unit}"
        n /= 1000
    return f"{n:.4g}P{unit}"


def parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Total, active-per-token and MTP parameter counts (unquantized sizes; nothing is allocated).

    Active parameters are those a token's forward pass multiplies with: all but the idle routed experts
    and the input embedding (a row lookup), as DeepSeek counts them (V2-Lite 2.4B, V3 37B).
    """
    shapes = dict(tree_flatten(Model(_float(args)).parameters()))
    size = {k: v.size for k, v in shapes.items()}
    mtp = sum(v for k, v in size.items() if k.startswith("mtp."))
    total = sum(size.values()) - mtp
    routed = sum(v for k, v in size.items() if ".switch_mlp." in k and not k.startswith("mtp."))
    idle = routed * (1 - (args.num_experts_per_tok or 0) / (args.n_routed_experts or 1))
    embedding = 0 if args.tie_word_embeddings else size["model.embed_tokens.weight"]
    return {"total": total, "active": int(total - idle - embedding), "mtp": mtp}


def _float(args: ModelArgs) -> ModelArgs:
    from dataclasses import replace

    return replace(args, quantization=None)


def describe(folder: Path) -> dict:
    """Family, parameter counts, storage, quantization and KV-cache cost of a model folder."""
    args = ModelArgs.from_file(folder)
    try:
        files = weight_files(folder) + ([folder / MTP_FILE] if (folder / MTP_FILE).exists() else [])
    except CheckpointError:  # a config-only folder still has a family, a size and a KV cost
        files = []
    dtypes: Counter = Counter()
    for f in files:
        for info in read_header(f).values():
            dtypes[info["dtype"]] += 1
    act_bytes = 4 if "F32" in dtypes or (not dtypes and args.torch_dtype == "float32") else 2
    counts = parameter_counts(args)
    if args.quantization:
        q = args.quantization
        quant = f"affine {q['bits']}-bit, group size {q['group_size']}"
    elif "F8_E4M3" in dtypes:
        quant = "FP8 e4m3, 128x128 block scales"
    elif not files:
        quant = "unknown (no weights in the folder)"
    else:
        quant = "none"
    return {
        "path": str(folder),
        "model_type": args.model_type,
        "family": FAMILIES[args.model_type],
        "attention": "MLA" if args.uses_mla else ("MHA" if args.num_key_value_heads == args.num_attention_heads else "GQA"),
        "layers": args.num_hidden_layers,
        "moe": (
            f"{args.n_routed_experts} routed (top-{args.num_experts_per_tok}, {args.topk_method}, {args.scoring_func})"
            f" + {args.n_shared_experts or 0} shared" if args.n_routed_experts else "dense"
        ),
        "parameters": counts["total"],
        "active_parameters": counts["active"],
        "mtp_parameters": counts["mtp"],
        "dtypes": dict(dtypes),
        "quantization": quant,
        "disk_bytes": sum(f.stat().st_size for f in files),
        "kv_cache_bytes_per_token": args.kv_cache_bytes_per_token(act_bytes),
        "mha_kv_cache_bytes_per_token": args.mha_kv_cache_bytes_per_token(act_bytes),
        "kv_cache_dtype_bytes": act_bytes,
    }
