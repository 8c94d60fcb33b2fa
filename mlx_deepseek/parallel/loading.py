"""Rank-local loading: each rank reads from disk only the tensors it holds.

Pipeline (`pp`): its decoder layers (plus the replicated embedding, final norm and head). Experts (`ep`):
every non-expert tensor, and of the routed experts only its block: a Hugging Face checkpoint stores one
tensor per expert (the others are never opened); an MLX-layout checkpoint stacks a layer's experts on
axis 0, so the block is one contiguous byte range of each stacked tensor, read by its safetensors offset
(offload.source's reader) without reading the rest. FP8 release checkpoints work too (per-expert tensors,
dequantized after reading). The MTP module is not loaded: speculative decoding does not run distributed.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import mlx.core as mx
import numpy as np

from ..config import ModelArgs
from ..loading import _dtype, for_device, resolve
from ..models import Model
from ..offload.source import ExpertReader, Span, _data_start
from ..weights import check_weights, hf_to_mlx, join_gate_up, quantize_like, read_header, weight_files
from .data import active
from .experts import shard_experts
from .pipeline import pipeline, split

MODES = ("ep", "pp")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_HF_EXPERT = re.compile(r"(.*\.mlp\.experts\.)(\d+)(\..+)$")
_STACKED = re.compile(r".*\.mlp\.switch_mlp\.")
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "U8": np.uint8,
          "I8": np.int8, "I32": np.int32, "F8_E4M3": np.uint8}


@dataclass
class Shard:
    """What one rank holds: decoder `layers` (all for EP) and routed `experts` of each MoE layer (None:
    all, for PP); `bytes_read` / `bytes_total` count the checkpoint's tensor bytes it read / stores."""

    mode: str
    rank: int
    size: int
    layers: range
    experts: Optional[range]
    bytes_read: int = 0
    bytes_total: int = 0


def plan(args: ModelArgs, mode: str, rank: int, size: int) -> Shard:
    """Rank `rank`'s share of a model split `mode` ("ep" or "pp") over `size` ranks."""
    if mode not in MODES:
        raise ValueError(f"parallel={mode!r}: expected one of {MODES}")
    if mode == "ep":
        if not args.n_routed_experts:
            raise ValueError(f"{args.model_type}: a dense model has no experts to split; use --parallel pp")
        return Shard(mode, rank, size, range(args.num_hidden_layers), split(args.n_routed_experts, rank, size))
    return Shard(mode, rank, size, split(args.num_hidden_layers, rank, size), None)


def _rows(reader: ExpertReader, path: Path, start: int, info: dict, rows: range) -> mx.array:
    """Rows `rows` of a tensor stacked on axis 0, read by byte offset (nothing else of it is read)."""
    lo, hi = info["data_offsets"]
    shape = tuple(info["shape"])
    per = (hi - lo) // shape[0]
    span = Span(path, start + lo + rows.start * per, len(rows) * per, info["dtype"], (len(rows), *shape[1:]))
    buf = bytearray(span.nbytes)
    reader.read_raw(span, memoryview(buf))
    a = mx.array(np.frombuffer(buf, dtype=_NUMPY[info["dtype"]]).reshape(span.shape))
    return a.view(mx.bfloat16) if info["dtype"] == "BF16" else a


def local_tensors(folder: Path, args: ModelArgs, shard: Shard) -> Iterator[tuple[str, mx.array]]:
    """(checkpoint name, array) of the tensors this rank holds, expert numbers made local (block start 0).
    Whole tensors come lazily from mx.load (read when evaluated); stacked-expert blocks are read here."""
    reader = ExpertReader("pread")
    try:
        for path in weight_files(folder):
            header, start, arrays = read_header(path), _data_start(path), None
            for raw, info in header.items():
                lo, hi = info["data_offsets"]
                shard.bytes_total += hi - lo
                m = _LAYER.match(raw)
                if m is not None and int(m.group(1)) not in shard.layers:
                    continue  # another stage's layer, or an MTP layer (numbered after the main ones)
                name = raw
                if shard.experts is not None and (e := _HF_EXPERT.match(raw)) is not None:
                    if int(e.group(2)) not in shard.experts:
                        continue
                    name = f"{e.group(1)}{int(e.group(2)) - shard.experts.start}{e.group(3)}"
                if shard.experts is not None and _STACKED.match(raw) is not None:
                    a = _rows(reader, path, start, info, shard.experts)
                    shard.bytes_read += a.nbytes
                    yield name, a
                    continue
                arrays = arrays if arrays is not None else mx.load(str(path))
                shard.bytes_read += hi - lo
                yield name, arrays.pop(raw)
    finally:
        reader.close()


def local_weights(folder: Path, args: ModelArgs, shard: Shard, dtype=None, problems=None) -> dict[str, mx.array]:
    """This rank's weights in the local model's names (MLX layout; PP layers renumbered from 0)."""
    local = copy.copy(args)  # only the stacking count and the MTP numbering differ; no re-validation
    local.num_nextn_predict_layers = 0
    if shard.experts is not None:
        local.n_routed_experts = len(shard.experts)
    first = shard.layers.start

    def renumber(name: str) -> str:
        m = _LAYER.match(name)
        return name if m is None or not first else f"model.layers.{int(m.group(1)) - first}.{name[m.end():]}"

    tensors = hf_to_mlx(local_tensors(folder, args, shard), local, dtype, problems)
    return join_gate_up({renumber(k): v for k, v in tensors}, args)


def load_sharded(
    path_or_repo: Union[str, Path, None], parallel: str = "ep", group: Optional[mx.distributed.Group] = None,
    dtype=None,
) -> Model:
    """This rank's part of a model split over `group` (default: the global one) by experts ("ep") or by
    layers ("pp"), read from disk rank-locally. `model.shard` tells what was read. On a single rank the
    whole model is loaded (no MTP module)."""
    group = group if group is not None else mx.distributed.init()
    folder = resolve(path_or_repo)
    args = ModelArgs.from_file(folder)
    args.num_nextn_predict_layers = 0
    shard = plan(args, parallel, group.rank(), group.size())
    if active(group) is None:
        shard = Shard(parallel, 0, 1, range(args.num_hidden_layers), None)
    problems: list[str] = []
    weights = for_device(local_weights(folder, args, shard, _dtype(dtype), problems), args)
    model = Model(args)
    if active(group) is not None:
        (shard_experts if parallel == "ep" else pipeline)(model, group)
    if args.quantization is not None:
        quantize_like(model, args.quantization, set(weights))
    check_weights(model, weights, f"{folder} (rank {shard.rank} of {shard.size}, {parallel})", problems)
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    mx.eval(model.parameters())
    object.__setattr__(model, "shard", shard)  # a plain attribute, not a parameter
    return model


def memory_per_rank(args: ModelArgs, mode: str, ranks: int, bits: int = 4, group_size: int = 64,
                    context: int = 32768) -> dict:
    """Weight and KV-cache bytes of the fullest rank when `args`'s model is split `mode` over `ranks`,
    every matrix (embedding and head included) affine-quantized to `bits` with a float16 scale and bias per
    `group_size` weights, vectors (norms, router bias) in float32; the MTP module is not loaded. The KV
    cache is MLA's latent + k_pe (bfloat16) of `context` tokens: whole on every rank for EP (attention is
    replicated), by layer for PP. Nothing is allocated (shapes of a lazily built model)."""
    from dataclasses import replace

    from mlx.utils import tree_flatten

    shapes = dict(tree_flatten(Model(replace(args, quantization=None, num_nextn_predict_layers=0)).parameters()))
    per_weight = bits / 8 + 4 / group_size  # payload + fp16 scale and bias per group

    def nbytes(a) -> float:
        return a.size * (per_weight if a.ndim >= 2 else 4)

    kv_layer = args.kv_cache_bytes_per_token(2) / args.num_hidden_layers * context
    worst = {"weights": 0.0, "kv_cache": 0.0}
    for rank in range(ranks):
        shard = plan(args, mode, rank, ranks)
        weights = 0.0
        for name, a in shapes.items():
            m = _LAYER.match(name)
            if m is not None and int(m.group(1)) not in shard.layers:
                continue
            share = len(shard.experts) / args.n_routed_experts if shard.experts and ".switch_mlp." in name else 1.0
            weights += nbytes(a) * share
        kv = kv_layer * len(shard.layers)
        worst = {"weights": max(worst["weights"], weights), "kv_cache": max(worst["kv_cache"], kv)}
    return worst
