"""The streaming converter: Hugging Face (FP8 included) or MLX in, MLX (float or quantized) or Hugging Face out.

One pass over the source shards:

    read shard by shard -> [dequantize an MLX-quantized source] -> hf_to_mlx (FP8 dequant, expert
    stacking, kv_b split) -> check name and shape against the model config.json describes
    -> MLX out: quantize per recipe, rejoin kv_b_proj for deepseek_v2 | HF out: mlx_to_hf
    -> shard writers (model-*, and mtp-* for the MTP modules), each flushed when it fills.

Every tensor is evaluated as soon as it is produced, and a shard is written and dropped as soon as it is
full, so memory holds about one input shard's pending tensors and one output shard.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_deepseek import __version__
from mlx_deepseek.config import FAMILIES, ModelArgs, stored_paths
from mlx_deepseek.loading import DTYPES, resolve
from mlx_deepseek.models import Model
from mlx_deepseek.weights import (
    atomic_folder,
    CheckpointError,
    hf_to_mlx,
    iter_safetensors,
    join_kv_b,
    mlx_to_hf,
    mtp_files,
    read_header,
    split_gate_up,
    weight_files,
)

from . import recipes
from .writer import ConvertError, ShardWriter

TOKENIZER_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "*.model",
    "*.tiktoken", "*.jinja", "chat_template.json", "generation_config.json",
)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
}
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?)i?B?\s*$", re.I)


def parse_size(text) -> int:
    """'5GB' / '500MB' / '1.5G' / a plain number of bytes -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConvertError(f"--shard-size {text!r}: expected a size such as 5GB, 500MB or 1.5G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


@dataclass
class Report:
    src: str
    dst: str
    to: str
    dtype: str
    quantization: Optional[dict]
    tensors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    shards: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_mlx_bytes: int = 0
    largest_input_shard: int = 0
    verify_error: Optional[float] = None
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        q = self.quantization
        what = "float" if q is None else f"quantized ({q['recipe']}, {q['bits']}-bit, group {q['group_size']})"
        line = (
            f"wrote {self.dst} ({self.to} layout, {what}, {self.dtype}): {self.tensors} tensors, "
            f"{self.bytes_out / 1e9:.3f} GB in {self.shards} shard(s) from {self.bytes_in / 1e9:.3f} GB in "
            f"{self.seconds:.1f} s; peak RSS {self.peak_rss_bytes / 1e9:.2f} GB "
            f"(largest input shard {self.largest_input_shard / 1e9:.2f} GB), MLX peak {self.peak_mlx_bytes / 1e9:.2f} GB"
        )
        if self.verify_error is not None:
            line += f"\nverify: relative logits error {self.verify_error:.3e} (DST vs SRC)"
        return "\n".join([line] + self.notes)


def peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


# ---- the stream stages -------------------------------------------------------------------------
def _read(files: list[Path], progress) -> Iterator[tuple[str, mx.array]]:
    for path in files:
        yield from iter_safetensors([path])
        if progress is not None:
            progress.update(path.stat().st_size)


def dequantize_stream(
    tensors: Iterable[tuple[str, mx.array]], args: ModelArgs, in_dims: dict[str, int]
) -> Iterator[tuple[str, mx.array]]:
    """MLX-quantized (affine) modules -> float weights; bits and group size read from the shapes
    (weight [.., out, in*bits/32], scales [.., out, in/group]), as mlx-lm's loader infers them."""
    block = args.quantization or {}
    if block.get("mode", "affine") != "affine":
        raise CheckpointError(f"quantization mode {block['mode']!r}: only affine quantization can be dequantized")
    pending: dict[str, dict[str, mx.array]] = {}
    for name, a in tensors:
        path, _, kind = name.rpartition(".")
        if kind in ("scales", "biases") or (kind == "weight" and a.dtype == mx.uint32):
            parts = pending.setdefault(path, {})
            parts[kind] = a
            if len(parts) < 3:
                continue
            del pending[path]
            w, scales = parts["weight"], parts["scales"]
            in_dim = in_dims.get(path)
            if in_dim is None:  # fall back to the config's block
                p = args.quantization_of(path)
                bits, group = p["bits"], p["group_size"]
            else:
                bits, group = w.shape[-1] * 32 // in_dim, in_dim // scales.shape[-1]
            yield f"{path}.weight", mx.dequantize(w, scales, parts["biases"], group_size=group, bits=bits)
        else:
            yield name, a
    if pending:
        raise CheckpointError(
            "incomplete quantized tensors (weight, scales and biases belong together): " + ", ".join(sorted(pending))
        )


def _expected(args: ModelArgs):
    """Parameter shapes and quantizable modules of the model config.json describes (nothing is allocated:
    MLX arrays are lazy and never evaluated here)."""
    skeleton = Model(args)
    shapes = {k: tuple(v.shape) for k, v in split_gate_up(dict(tree_flatten(skeleton.parameters()))).items()}
    quantizable = {
        stored: m.weight.shape[-1]
        for p, m in skeleton.named_modules() if hasattr(m, "to_quantized") for stored in stored_paths(p)
    }
    return shapes, quantizable


def _checked(tensors, shapes: dict, seen: set, drop_mtp: bool, plan: dict):
    """Every tensor must be a parameter of the model config.json describes, in its shape (routed experts
    may arrive quantized already: weight [.., in*bits/32] with scales and biases)."""
    for name, a in tensors:
        if drop_mtp and name.startswith("mtp."):
            continue
        path, _, kind = name.rpartition(".")
        q = plan.get(path)
        if q and kind in ("scales", "biases"):
            yield name, a
            continue
        if name not in shapes:
            raise CheckpointError(
                f"unexpected tensor {name} {tuple(a.shape)}: the model config.json describes has no such parameter "
                "(is config.json the one of these weights?)"
            )
        expected = shapes[name]
        if q and kind == "weight" and a.dtype == mx.uint32:
            expected = expected[:-1] + (expected[-1] * q["bits"] // 32,)
        if tuple(a.shape) != expected:
            raise CheckpointError(f"{name}: shape {tuple(a.shape)}, config.json's model expects {expected}")
        seen.add(name)
        yield name, a


def plan_quantization(
    args: ModelArgs, quantizable: dict[str, int], recipe: str, bits: int, group_size: int, high_bits: int,
    drop_mtp: bool,
) -> tuple[dict[str, dict], dict]:
    """{module path: params} of the modules to quantize, and the config's `quantization` block:
    defaults {group_size, bits, mode} plus one entry per module that differs (params, or false)."""
    rule = recipes.get(recipe)
    default = {"group_size": group_size, "bits": bits, "mode": "affine"}
    plan, block = {}, dict(default)
    v2 = args.model_type == "deepseek_v2" and args.uses_mla
    for path, in_dim in quantizable.items():
        if drop_mtp and path.startswith("mtp."):
            continue
        if v2 and path.endswith((".self_attn.embed_q", ".self_attn.unembed_out")):
            # written as mlx-lm's deepseek_v2 expects: kv_b_proj, kept float (see Package.md)
            block[path.rsplit(".", 1)[0] + ".kv_b_proj"] = False
            continue
        params = rule(path, args, bits, group_size, high_bits)
        if params and in_dim % params["group_size"] != 0:
            params = False
        if params:
            plan[path] = params
        if params != default:
            block[path] = params
    return plan, {**default, **dict(sorted((k, v) for k, v in block.items() if k not in default))}


def _quantize(path: str, a: mx.array, params: dict) -> list[tuple[str, mx.array]]:
    w, scales, biases = mx.quantize(a, group_size=params["group_size"], bits=params["bits"])
    mx.eval(w, scales, biases)  # now, so the float source can be freed before the next tensor
    return [(f"{path}.weight", w), (f"{path}.scales", scales), (f"{path}.biases", biases)]


_EXPERT = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _expert_quantizer(plan: dict):
    """Quantize routed experts one by one as they arrive (hf_to_mlx stacks the quantized parts):
    the same numbers as quantizing the stacked tensor, since groups run along each row."""

    def transform(name: str, a: mx.array):
        m = _EXPERT.match(name)
        params = plan.get(f"{m.group(1)}.switch_mlp.{m.group(3)}") if m and a.dtype != mx.uint32 else None
        if not params:
            return [(name, a)]
        return _quantize(name[: -len(".weight")], a, params)

    return transform


def _quantized(tensors, plan: dict) -> Iterator[tuple[str, mx.array]]:
    for name, a in tensors:
        path, _, kind = name.rpartition(".")
        params = plan.get(path) if kind == "weight" and a.dtype != mx.uint32 else None
        if params is None:
            yield name, a
        else:
            parts = _quantize(path, a, params)
            del a
            yield from parts


_SPLIT = re.compile(r"(.*\.self_attn)\.(embed_q|unembed_out)\.weight$")


def _rejoin_kv_b(tensors) -> Iterator[tuple[str, mx.array]]:
    """deepseek_v2 in mlx-lm keeps MLA's kv_b_proj whole: put W_UK and W_UV back together (exact)."""
    pending: dict[str, dict[str, mx.array]] = {}
    for name, a in tensors:
        m = _SPLIT.match(name)
        if m is None:
            yield name, a
            continue
        parts = pending.setdefault(m.group(1), {})
        parts[m.group(2)] = a
        if len(parts) == 2:
            del pending[m.group(1)]
            yield f"{m.group(1)}.kv_b_proj.weight", join_kv_b(parts["embed_q"], parts["unembed_out"])


# ---- the converter -------------------------------------------------------------------------------
def convert(
    src,
    dst,
    *,
    to: str = "mlx",
    dtype: Optional[str] = None,
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
    recipe: Optional[str] = None,
    high_bits: int = 6,
    dequantize: bool = False,
    drop_mtp: bool = False,
    shard_size="5GB",
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> Report:
    """Convert `src` (a folder or hub id) into the folder `dst`; see `mlx-deepseek convert --help`.

    to: "mlx" (mlx-lm's names, MTP in mtp*.safetensors) or "hf" (the hub layout, float).
    dtype: float dtype of the output; None keeps the stored one (FP8 becomes bfloat16).
    q_bits / recipe: quantize (either one turns it on; bits default 4, recipe "uniform").
    dequantize: an MLX-quantized source comes out as floats (implied by to="hf").
    """
    tic = time.perf_counter()
    if to not in ("mlx", "hf"):
        raise ConvertError(f"--to {to!r}: expected 'mlx' or 'hf'")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    quantize = q_bits is not None or recipe is not None
    recipe, q_bits = recipe or "uniform", q_bits or 4
    recipes.check(q_bits, q_group_size, high_bits)
    recipes.get(recipe)
    if quantize and (to == "hf" or dequantize):
        raise ConvertError("--q-bits/--recipe quantize; --to hf and --dequantize write floats: choose one")
    max_bytes = parse_size(shard_size)

    # Everything that can be wrong with the source is found before anything is written.
    folder = resolve(src)
    dst = Path(dst).expanduser()
    if dst.resolve() == folder.resolve():
        raise ConvertError(f"{dst}: is the source folder; write somewhere else")
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst}: already exists; pass --overwrite to replace it")
    args = ModelArgs.from_file(folder)
    files = weight_files(folder)
    files += [f for f in mtp_files(folder) if f not in files]
    for f in files:
        read_header(f)  # header JSON, dtypes and data length against the file size
    source_quantized = args.quantization is not None
    if source_quantized and to == "mlx" and not (dequantize or quantize):
        raise ConvertError(
            f"{folder}: already quantized ({args.quantization.get('bits')}-bit); pass --dequantize for floats, "
            "--q-bits/--recipe to re-quantize, or --to hf for the hub layout"
        )
    if dequantize and not source_quantized:
        raise ConvertError(f"--dequantize: {folder} is not quantized (config.json has no quantization block)")
    drop_mtp = drop_mtp or args.num_nextn_predict_layers == 0

    shapes, quantizable = _expected(args)
    if drop_mtp:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("mtp.")}
    plan, block = {}, None
    if quantize:
        plan, block = plan_quantization(args, quantizable, recipe, q_bits, q_group_size, high_bits, drop_mtp)
    in_dims = dict(quantizable)
    if args.uses_mla:  # mlx-lm's own deepseek_v2 layout stores kv_b_proj [H*(nope+v), kv_lora_rank]
        in_dims.update({p.rsplit(".", 1)[0] + ".kv_b_proj": args.kv_lora_rank for p in quantizable if p.endswith(".embed_q")})

    mx_dtype = DTYPES[dtype] if dtype else None
    sizes = [f.stat().st_size for f in files]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"convert {folder.name}", file=sys.stderr)
    report = Report(str(src), str(dst), to, dtype or "as stored", None, bytes_in=sum(sizes), largest_input_shard=max(sizes))
    stored: dict[str, int] = {}
    seen: set[str] = set()
    problems: list[str] = []
    old_cache_limit = mx.set_cache_limit(256 * 2**20)  # freed buffers go back to the system, not to a cache
    try:
        with atomic_folder(dst, overwrite) as tmp:
            stream = _read(files, bar)
            if source_quantized:
                stream = dequantize_stream(stream, args, in_dims)
            experts = _expert_quantizer(plan) if plan else None
            stream = _checked(hf_to_mlx(stream, args, mx_dtype, problems, experts), shapes, seen, drop_mtp, plan)
            if to == "hf":
                writers = {"model": ShardWriter(tmp, "model", max_bytes, {"format": "pt"})}
                stream = mlx_to_hf(stream, args)
            else:
                meta = {"format": "mlx"}
                writers = {"model": ShardWriter(tmp, "model", max_bytes, meta), "mtp": ShardWriter(tmp, "mtp", max_bytes, meta)}
                stream = _quantized(stream, plan)
                if args.model_type == "deepseek_v2" and args.uses_mla:
                    stream = _rejoin_kv_b(stream)
            for name, a in stream:
                if a.dtype in (mx.float32, mx.float16, mx.bfloat16) and not name.endswith("e_score_correction_bias"):
                    stored[str(a.dtype)] = stored.get(str(a.dtype), 0) + a.nbytes
                writers["mtp" if name.startswith("mtp.") else "model"].add(name, a)
            if problems:
                raise CheckpointError(f"{folder}: incomplete tensors:\n  " + "\n  ".join(problems))
            missing = sorted(set(shapes) - seen)
            if missing:
                shown = missing[:20] + ([f"... and {len(missing) - 20} more"] if len(missing) > 20 else [])
                raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing:\n  " + "\n  ".join(shown))

            weight_map = writers["model"].close()
            mtp_map = writers["mtp"].close() if "mtp" in writers else {}
            report.tensors = sum(w.tensors for w in writers.values())
            report.bytes_out = sum(w.total_bytes for w in writers.values())
            report.shards = len(set(weight_map.values()) | set(mtp_map.values()))
            index = {"metadata": {"total_size": writers["model"].total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

            out_dtype = max(stored, key=stored.get).replace("mlx.core.", "") if stored else "float32"
            report.dtype = out_dtype
            if quantize:
                report.quantization = {"recipe": recipe, "bits": q_bits, "group_size": q_group_size, "high_bits": high_bits}
            config = output_config(args, out_dtype, block, drop_mtp, to)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            copied = copy_tokenizer(folder, tmp)
            if not copied:
                report.notes.append(f"note: {folder} has no tokenizer files; DST has none either")
            (tmp / "README.md").write_text(model_card(src, dst, args, report, drop_mtp))
    finally:
        mx.set_cache_limit(old_cache_limit)
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - tic
    report.peak_rss_bytes = peak_rss()
    report.peak_mlx_bytes = mx.get_peak_memory()
    if verify:
        report.verify_error = verify_logits(folder, dst)
    return report


def output_config(args: ModelArgs, dtype: str, block: Optional[dict], drop_mtp: bool, to: str) -> dict:
    """config.json in the hub spelling (rope_theta + rope_scaling{type}), which mlx-lm reads too."""
    config = args.to_dict()
    for key in ("quantization", "quantization_config", "dtype"):
        config.pop(key, None)
    config["torch_dtype"] = dtype
    if drop_mtp:
        config["num_nextn_predict_layers"] = 0
    config.setdefault("architectures", [ARCHITECTURES[args.model_type]])
    if to == "mlx" and args.model_type == "deepseek_v2" and args.rope_scaling is None:
        # mlx-lm's deepseek_v2 always builds YaRN RoPE; YaRN with factor 1 is plain RoPE, exactly
        config["rope_scaling"] = {
            "type": "yarn", "factor": 1.0, "original_max_position_embeddings": args.max_position_embeddings,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0,
        }
    if block is not None:
        config["quantization"] = block
        config["quantization_config"] = dict(block)  # mlx-lm writes both spellings
    return config


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_FILES:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def model_card(src, dst: Path, args: ModelArgs, report: Report, drop_mtp: bool) -> str:
    q = report.quantization
    if q is None:
        quant = "none (float weights)"
    elif q["recipe"] == "mixed":
        quant = f"recipe `mixed`: routed experts {q['bits']}-bit, the rest {q['high_bits']}-bit, affine, group size {q['group_size']}"
    else:
        quant = f"recipe `{q['recipe']}`: {q['bits']}-bit affine, group size {q['group_size']}"
    layout = (
        "Hugging Face (per-expert tensors, `kv_b_proj` whole, MTP as extra layers)" if report.to == "hf"
        else "MLX (mlx-lm parameter names; MTP modules in `mtp*.safetensors`, which mlx-lm does not read)"
    )
    mtp = "none" if args.num_nextn_predict_layers == 0 else ("dropped (`--drop-mtp`)" if drop_mtp else "kept")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""---
library_name: mlx
tags: [mlx, deepseek]
base_model: {src}
---
# {Path(dst).name}

Converted with mlx-deepseek {__version__} on {date}.

| | |
|---|---|
| source | `{src}` |
| family | `{args.model_type}`: {FAMILIES[args.model_type]} |
| layout | {layout} |
| dtype | {report.dtype} |
| quantization | {quant} |
| MTP module | {mtp} |
| size | {report.bytes_out / 1e9:.3f} GB in {report.shards} file(s) |

```python
import mlx_deepseek
model, tokenizer = mlx_deepseek.load("{Path(dst).name}")
```
"""


def verify_logits(src: Path, dst: Path, tokens: int = 16) -> float:
    """max |DST - SRC| / max |SRC| over the logits of a fixed prompt (both loaded by this project)."""
    from mlx_deepseek.loading import load_model

    ours = load_model(dst, lazy=True)
    vocab = ours.args.vocab_size
    ids = mx.array([[(7 * i + 3) % vocab for i in range(tokens)]])
    out = ours(ids).astype(mx.float32)
    mx.eval(out)
    del ours
    ref = load_model(src, lazy=True)(ids).astype(mx.float32)
    return (mx.abs(out - ref).max() / mx.abs(ref).max()).item()
