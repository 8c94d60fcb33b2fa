"""Reading checkpoints: Hugging Face safetensors (FP8 included) and MLX-layout folders (ours, mlx-lm's).

Tensors are read lazily, shard by shard. `hf_to_mlx` turns a stream of hub-named tensors into
this project's parameter names (the table `KEY_MAP` and three structural rewrites: FP8 block
dequantization, per-expert stacking, and the split of MLA's `kv_b_proj` into W_UK / W_UV).
No code from a checkpoint ever runs: pickle weights are refused and `trust_remote_code` is not a thing here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs, stored_paths


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as asked."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MTP_FILE = "mtp.safetensors"  # MLX layout: MTP modules live apart so mlx-lm never sees them
_MTP_SHARD = re.compile(r"mtp-\d+-of-\d+\.safetensors$")  # the MTP file split in shards (large models)

_SAFETENSORS_DTYPES = {
    "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1,
}


# ---- files ---------------------------------------------------------------------------------------
def read_header(path: Path) -> dict:
    """The safetensors header of `path`, checked against the file's real length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header); download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors header (claims {n} bytes, file has {size}); download it again"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); download it again") from None
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, which this project cannot read")
        start, stop = info["data_offsets"]
        count = 1
        for d in info["shape"]:
            count *= d
        if stop - start != count * _SAFETENSORS_DTYPES[dtype]:
            raise CheckpointError(f"{path}: tensor {name}: data length does not match shape {info['shape']}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + n + end}); download it again"
        )
    return header


def weight_files(folder: Path) -> list[Path]:
    """The safetensors shards of a model folder (index order when there is an index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that are not in the folder: {', '.join(missing)}")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != MTP_FILE and not _MTP_SHARD.match(p.name))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder}: only pickle weights ({', '.join(pickles)}); they can run arbitrary code, so this "
                "project does not load them. Download the repository's safetensors files (most hub repos have "
                "them, some under a 'refs/pr' revision), or convert on a machine you trust with "
                "transformers: AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True)"
            )
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    return files


def mtp_files(folder: Path) -> list[Path]:
    """The MLX layout's MTP weights: `mtp.safetensors`, or `mtp-0000K-of-0000N.safetensors` shards."""
    folder = Path(folder)
    single = folder / MTP_FILE
    return [single] if single.exists() else sorted(p for p in folder.glob("mtp-*.safetensors") if _MTP_SHARD.match(p.name))


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, mx.array]]:
    """(name, lazy array) for every tensor, one shard after another."""
    for path in files:
        read_header(path)
        arrays = mx.load(str(path))
        for name in list(arrays):
            yield name, arrays.pop(name)  # dropped here, so a consumed tensor's memory can go


# ---- hub names -> MLX names ----------------------------------------------------------------------
def key_map(args: ModelArgs) -> list[tuple[re.Pattern, Optional[str]]]:
    """Renames from hub to MLX layout; a None target drops the tensor. MTP layers are numbered after the main ones."""
    n = args.num_hidden_layers
    mtp = rf"model\.layers\.({'|'.join(str(n + k) for k in range(args.num_nextn_predict_layers)) or 'x'})\."

    def mtp_index(m: re.Match) -> str:
        return str(int(m.group(1)) - n)

    table = [
        (r"(.*\.)?rotary_emb\.inv_freq$", None),
        (mtp + r"(embed_tokens|shared_head\.head)\.weight$", None),  # shared with the main model (V3 §2.2)
        (mtp + r"(enorm|hnorm|eh_proj)\.", lambda m: f"mtp.{mtp_index(m)}.{m.group(2)}."),
        (mtp + r"shared_head\.norm\.", lambda m: f"mtp.{mtp_index(m)}.norm."),
        (mtp, lambda m: f"mtp.{mtp_index(m)}.block."),
    ]
    if args.tie_word_embeddings:
        table.append((r"lm_head\.weight$", None))
    return [(re.compile(p), t) for p, t in table]


def rename(name: str, table) -> Optional[str]:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return None if target is None else target(m) + name[m.end():]
    return name


_EXPERT = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
_KV_B = re.compile(r"(.*\.self_attn)\.kv_b_proj\.(weight|scales|biases)$")


def dequantize_fp8(weight: mx.array, scale_inv: mx.array, dtype: mx.Dtype, block: int = 128) -> mx.array:
    """W = fp8(W_q) * s per 128x128 block (the DeepSeek-V3 release format); edge blocks are partial."""
    w = mx.from_fp8(weight, dtype=mx.float32)
    m, n = w.shape
    pm, pn = (-m) % block, (-n) % block
    w = mx.pad(w, ((0, pm), (0, pn))).reshape((m + pm) // block, block, (n + pn) // block, block)
    w = (w * scale_inv.astype(mx.float32)[:, None, :, None]).reshape(m + pm, n + pn)
    return w[:m, :n].astype(dtype)


def hf_to_mlx(
    tensors: Iterable[tuple[str, mx.array]],
    args: ModelArgs,
    dtype: Optional[mx.Dtype] = None,
    problems: Optional[list[str]] = None,
    expert_transform: Optional[Callable[[str, mx.array], Iterable[tuple[str, mx.array]]]] = None,
) -> Iterator[tuple[str, mx.array]]:
    """Stream hub-named tensors out as MLX-named ones; already-MLX names pass through unchanged.

    Per-expert tensors wait until all experts of their layer arrived (they may span shards), FP8
    weights until their `weight_scale_inv` did. `dtype` casts floating tensors (the router's correction
    bias stays float32); None keeps stored float dtypes and dequantizes FP8 to bfloat16. Tensors left
    incomplete at the end are described in `problems` (or raised as a CheckpointError if it is None).
    `expert_transform(name, tensor)` may replace each per-expert tensor before stacking (the converter
    quantizes expert by expert there, so a layer's float experts are never stacked in memory).
    """
    table = key_map(args)
    experts: dict[tuple, dict[int, mx.array]] = {}
    fp8: dict[str, dict[str, mx.array]] = {}
    kv_b: dict[str, dict[str, mx.array]] = {}
    fp8_dtype = dtype or mx.bfloat16

    def cast(name: str, a: mx.array) -> mx.array:
        if dtype is None or not mx.issubdtype(a.dtype, mx.floating) or name.endswith("e_score_correction_bias"):
            return a
        return a.astype(dtype)

    def emit(name: str, a: mx.array) -> Iterator[tuple[str, mx.array]]:
        if _EXPERT.match(name) is not None:
            a = cast(name, a)
            for name, a in expert_transform(name, a) if expert_transform else ((name, a),):
                m = _EXPERT.match(name)
                key = (m.group(1), m.group(3), m.group(4))
                group = experts.setdefault(key, {})
                group[int(m.group(2))] = a
                if len(group) == args.n_routed_experts:
                    del experts[key]
                    stacked = mx.stack([group.pop(e) for e in range(args.n_routed_experts)])
                    yield f"{key[0]}.switch_mlp.{key[1]}.{key[2]}", stacked
        elif (m := _KV_B.match(name)) is not None:
            parts = kv_b.setdefault(m.group(1), {})
            parts[m.group(2)] = a
            quantized = "weight" in parts and parts["weight"].dtype == mx.uint32
            if "weight" in parts and (not quantized or {"scales", "biases"} <= parts.keys()):
                del kv_b[m.group(1)]
                yield from split_kv_b(m.group(1), parts, args)
        else:
            yield name, cast(name, a)

    for name, a in tensors:
        name = rename(name, table)
        if name is None:
            continue
        if name.endswith(".weight_scale_inv") or (name.endswith(".weight") and a.dtype == mx.uint8):
            base = name.rsplit(".", 1)[0]
            parts = fp8.setdefault(base, {})
            parts[name.rsplit(".", 1)[1]] = a
            if len(parts) < 2:
                continue
            del fp8[base]
            name, a = base + ".weight", dequantize_fp8(parts["weight"], parts["weight_scale_inv"], fp8_dtype)
        yield from emit(name, a)

    leftovers = [f"incomplete: {b}: FP8 {next(iter(g))} without its partner" for b, g in fp8.items()]
    leftovers += [
        f"incomplete: {p}.experts.*.{proj}.{k}: {len(g)} of {args.n_routed_experts} experts"
        for (p, proj, k), g in experts.items()
    ]
    leftovers += [f"incomplete: {p}.kv_b_proj ({', '.join(sorted(g))} only)" for p, g in kv_b.items()]
    if problems is not None:
        problems.extend(leftovers)
    elif leftovers:
        raise CheckpointError("incomplete tensors in checkpoint:\n  " + "\n  ".join(leftovers))


def split_kv_b(prefix: str, parts: dict, args: ModelArgs) -> Iterator[tuple[str, mx.array]]:
    """kv_b_proj [H*(d_nope+d_v), r] -> embed_q (W_UK^T, [H, r, d_nope]) and unembed_out (W_UV, [H, d_v, r])."""
    w = parts["weight"]
    q = args.quantization
    if "scales" in parts:
        w = mx.dequantize(w, parts["scales"], parts["biases"], group_size=q["group_size"], bits=q["bits"])
    w = w.reshape(args.num_attention_heads, args.qk_nope_head_dim + args.v_head_dim, -1)
    w_uk = mx.contiguous(w[:, : args.qk_nope_head_dim, :].swapaxes(-1, -2))
    w_uv = mx.contiguous(w[:, args.qk_nope_head_dim :, :])
    for name, m in (("embed_q", w_uk), ("unembed_out", w_uv)):
        if "scales" in parts:
            m, scales, biases = mx.quantize(m, group_size=q["group_size"], bits=q["bits"])
            yield f"{prefix}.{name}.scales", scales
            yield f"{prefix}.{name}.biases", biases
        yield f"{prefix}.{name}.weight", m


def join_kv_b(w_uk: mx.array, w_uv: mx.array) -> mx.array:
    """The inverse of `split_kv_b`: embed_q [H, r, d_nope] and unembed_out [H, d_v, r] -> kv_b_proj
    [H*(d_nope+d_v), r] (float; a pure re-arrangement, so exact)."""
    return mx.concatenate([w_uk.swapaxes(-1, -2), w_uv], axis=1).reshape(-1, w_uv.shape[-1])


# ---- MLX names -> hub names ----------------------------------------------------------------------
_SWITCH = re.compile(r"(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_SPLIT_KV = re.compile(r"(.*\.self_attn)\.(embed_q|unembed_out)\.weight$")
_MTP = re.compile(r"mtp\.(\d+)\.")


def mlx_to_hf(tensors: Iterable[tuple[str, mx.array]], args: ModelArgs) -> Iterator[tuple[str, mx.array]]:
    """Stream float MLX-named tensors (as `hf_to_mlx` yields them) out in the hub layout: per-expert
    tensors, MLA's `kv_b_proj` as one matrix, MTP module k as `model.layers.{N+k}.*` with its own copies
    of the main model's `embed_tokens` and `shared_head.head` (as the DeepSeek-V3 release stores them)."""
    n = args.num_hidden_layers
    pending: dict[str, dict[str, mx.array]] = {}

    def hub(name: str) -> str:
        m = _MTP.match(name)
        if m is None:
            return name
        layer, rest = f"model.layers.{n + int(m.group(1))}.", name[m.end():]
        if rest.startswith("block."):
            return layer + rest[len("block."):]
        if rest.startswith("norm."):
            return layer + "shared_head." + rest
        return layer + rest  # enorm, hnorm, eh_proj

    for name, a in tensors:
        if a.dtype == mx.uint32:
            raise CheckpointError(f"{name}: quantized; dequantize before writing the hub layout")
        if (m := _SWITCH.match(name)) is not None:
            prefix, proj = hub(m.group(1)), m.group(2)
            for e in range(a.shape[0]):
                yield f"{prefix}.experts.{e}.{proj}.weight", a[e]
        elif (m := _SPLIT_KV.match(name)) is not None:
            parts = pending.setdefault(m.group(1), {})
            parts[m.group(2)] = a
            if len(parts) == 2:
                del pending[m.group(1)]
                yield hub(m.group(1)) + ".kv_b_proj.weight", join_kv_b(parts["embed_q"], parts["unembed_out"])
        else:
            yield hub(name), a
            copies = []
            if name == "model.embed_tokens.weight":
                copies = ["embed_tokens"] + (["shared_head.head"] if args.tie_word_embeddings else [])
            elif name == "lm_head.weight":
                copies = ["shared_head.head"]
            for k in range(args.num_nextn_predict_layers):
                for c in copies:
                    yield f"model.layers.{n + k}.{c}.weight", a
    if pending:
        raise CheckpointError("incomplete MLA attention (embed_q without unembed_out or back): " + ", ".join(pending))


# ---- the routed experts' W_gate and W_up: two stacks in checkpoints, one in the model ---------------
_GATE_UP = re.compile(r"(.*\.switch_mlp)\.(gate_proj|up_proj)\.(weight|scales|biases)$")
_JOINED = re.compile(r"(.*\.switch_mlp)\.gate_up_proj\.(weight|scales|biases)$")


def join_gate_up(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """The checkpoint's (mlx-lm's) `switch_mlp.gate_proj` and `up_proj` stacks, [E, I, .] each, as the model's
    `switch_mlp.gate_up_proj` [E, 2I, .] (RoutedExperts; quantized ones too: their groups run along the input).
    A layer with one half only is left as it is, for check_weights to name."""

    def setting(path: str) -> Optional[tuple]:  # (bits, group size, mode), None for a float layer
        if (args.quantization or {}).get(path) is False:
            return None
        p = args.quantization_of(path)
        return p.get("bits"), p.get("group_size"), p.get("mode", "affine")

    out, halves = {}, {}
    for name, a in weights.items():
        m = _GATE_UP.match(name)
        if m is None:
            out[name] = a
        else:
            halves.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = (name, a)
    for (prefix, leaf), pair in halves.items():
        if len(pair) < 2:
            out.update(pair.values())
            continue
        gate, up = setting(f"{prefix}.gate_proj"), setting(f"{prefix}.up_proj")
        if gate != up:
            raise CheckpointError(
                f"{prefix}: gate_proj and up_proj are quantized differently ((bits, group size, mode) {gate} vs "
                f"{up} in config.json); this project runs them as one matrix, so convert the model with one setting "
                "for both"
            )
        out[f"{prefix}.gate_up_proj.{leaf}"] = mx.concatenate([pair["gate_proj"][1], pair["up_proj"][1]], axis=1)
    return out


def split_gate_up(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """The inverse of `join_gate_up`: what checkpoints (and mlx-lm) store."""
    out = {}
    for name, a in weights.items():
        m = _JOINED.match(name)
        if m is None:
            out[name] = a
        else:
            prefix, leaf = m.groups()
            out[f"{prefix}.gate_proj.{leaf}"], out[f"{prefix}.up_proj.{leaf}"] = mx.split(a, 2, axis=1)
    return out


# ---- into a model --------------------------------------------------------------------------------
def quantize_like(model: nn.Module, quantization: dict, names: set[str]) -> None:
    """Turn the layers that the checkpoint stores quantized (those with `.scales`) into quantized layers."""

    def predicate(path: str, module: nn.Module):
        stored = stored_paths(path)[0]
        if stored in quantization:
            return quantization[stored]
        return hasattr(module, "to_quantized") and f"{path}.scales" in names

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array], where: str, problems: list[str] = ()) -> None:
    """One error listing every missing, unexpected, mis-shaped (or, from `problems`, incomplete) tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(weights[k].shape)}"
        for k in set(expected) & set(weights)
        if tuple(expected[k].shape) != tuple(weights[k].shape)
    )
    problems = list(problems) + [f"missing: {k} (expected {tuple(expected[k].shape)})" for k in missing]
    problems += [f"unexpected: {k} {tuple(weights[k].shape)}" for k in unexpected]
    problems += [f"wrong shape: {w}" for w in wrong]
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise CheckpointError(
            f"{where}: the weights do not fit the model that config.json describes "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped, "
            f"{len(problems) - len(missing) - len(unexpected) - len(wrong)} incomplete):\n  "
            + "\n  ".join(shown)
        )


def read_weights(
    folder: Path, args: ModelArgs, dtype: Optional[mx.Dtype] = None, problems: Optional[list[str]] = None
) -> dict[str, mx.array]:
    """All weights of a checkpoint folder as the model names them, lazily (nothing is read until evaluated)."""
    files = weight_files(folder)
    files += [f for f in mtp_files(folder) if f not in files]
    return join_gate_up(dict(hf_to_mlx(iter_safetensors(files), args, dtype, problems)), args)


# ---- writing --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_folder(dst: Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary folder beside `dst` to write into; renamed to `dst` when the block ends normally,
    removed on any exception (KeyboardInterrupt included), so `dst` is either complete or absent."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():  # --overwrite: the old folder goes only once the new one is complete
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: nn.Module, folder: Path, config: dict) -> None:
    """Write a model in the MLX layout: config.json, model.safetensors (what mlx-lm reads) and, when the
    model has MTP modules, mtp.safetensors. The caller makes the write atomic (a temporary folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = split_gate_up(dict(tree_flatten(model.parameters())))
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    mtp = {k: v for k, v in weights.items() if k.startswith("mtp.")}
    mx.save_safetensors(str(folder / "model.safetensors"), main, metadata={"format": "mlx"})
    if mtp:
        mx.save_safetensors(str(folder / MTP_FILE), mtp, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
