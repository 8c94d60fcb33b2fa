"""Where each routed expert's bytes live in a checkpoint, and reading them into a slot without loading the rest.

MLX layout (this project's and mlx-lm's converted checkpoints): `...mlp.switch_mlp.{gate,up,down}_proj.
{weight,scales,biases}` stack the experts on axis 0, so expert e is one contiguous byte range of each tensor.
Hugging Face layout: `...mlp.experts.{e}.{gate,up,down}_proj.weight`, one tensor per expert (also one range).
FP8 experts need a block dequantization first and are refused with a message that says to convert.
The safetensors header gives every offset; no expert tensor is ever loaded as a whole.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelArgs
from ..weights import CheckpointError, key_map, mtp_files, read_header, rename, weight_files

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_STACKED = re.compile(r"(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
_PER_EXPERT = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases|weight_scale_inv)$")
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "U32": np.uint32, "BF16": None, "U8": np.uint8, "I8": np.int8}


@dataclass(frozen=True)
class Span:
    """One expert's bytes of one tensor: `nbytes` at `offset` of `path`, stored as `dtype` with `shape`."""

    path: Path
    offset: int
    nbytes: int
    dtype: str  # safetensors spelling: F32, BF16, U32, ...
    shape: tuple


@dataclass
class ExpertLayout:
    """layers[mlp prefix][param][expert] -> Span, with param like 'gate_proj.weight'; `names` are the
    checkpoint's own tensor names of all routed experts (what the loader leaves out)."""

    layers: dict[str, dict[str, list[Span]]]
    names: set[str]

    def expert_bytes(self, prefix: str) -> int:
        """Stored bytes of one expert of a layer (all its tensors)."""
        return sum(spans[0].nbytes for spans in self.layers[prefix].values())

    @property
    def total_bytes(self) -> int:
        return sum(self.expert_bytes(p) * len(next(iter(v.values()))) for p, v in self.layers.items())


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def expert_layout(folder: Path, args: ModelArgs) -> ExpertLayout:
    """The byte ranges of every routed expert of every MoE layer (main model and MTP) of a checkpoint."""
    folder = Path(folder)
    files = weight_files(folder)
    files += [f for f in mtp_files(folder) if f not in files]
    table = key_map(args)
    n_experts = args.n_routed_experts
    layers: dict[str, dict[str, list]] = {}
    names: set[str] = set()
    for path in files:
        header, start = read_header(path), _data_start(path)
        for raw, info in header.items():
            name = rename(raw, table)
            if name is None:
                continue
            lo, hi = info["data_offsets"]
            if (m := _STACKED.match(name)) is not None:
                prefix, param = m.group(1), f"{m.group(2)}.{m.group(3)}"
                shape = tuple(info["shape"])
                if not shape or shape[0] != n_experts:
                    raise CheckpointError(f"{path}: {raw} has shape {shape}; expected {n_experts} experts on axis 0")
                per = (hi - lo) // n_experts
                layers.setdefault(prefix, {})[param] = [
                    Span(path, start + lo + e * per, per, info["dtype"], shape[1:]) for e in range(n_experts)
                ]
            elif (m := _PER_EXPERT.match(name)) is not None:
                if info["dtype"] == "F8_E4M3" or m.group(4) == "weight_scale_inv":
                    raise CheckpointError(
                        f"{path}: {raw}: FP8 experts must be dequantized before they can be offloaded; convert the "
                        "checkpoint first (mlx-deepseek convert SRC -o DST [-q]) and offload from the converted folder"
                    )
                prefix, e, param = m.group(1), int(m.group(2)), f"{m.group(3)}.{m.group(4)}"
                spans = layers.setdefault(prefix, {}).setdefault(param, [None] * n_experts)
                spans[e] = Span(path, start + lo, hi - lo, info["dtype"], tuple(info["shape"]))
            else:
                continue
            names.add(raw)
    for prefix, params in layers.items():
        for param, spans in params.items():
            missing = [e for e, s in enumerate(spans) if s is None]
            if missing:
                raise CheckpointError(f"{folder}: {prefix}.experts.*.{param}: experts {missing[:8]} are missing")
    if not layers:
        raise CheckpointError(f"{folder}: no routed experts found (a dense model has nothing to offload)")
    return ExpertLayout(layers, names)


# ---- reading -------------------------------------------------------------------------------------------
def bfloat16_to_float32(raw: memoryview) -> np.ndarray:
    bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


class ExpertReader:
    """Reads spans into writable byte buffers: `pread` (one copy, page cache -> slot) or `mmap` (the file
    mapped once; a copy from the mapping). Both read only the bytes asked for. Keeps one descriptor per file."""

    METHODS = ("pread", "mmap")

    def __init__(self, method: str = "pread"):
        if method not in self.METHODS:
            raise ValueError(f"reader={method!r}: expected one of {self.METHODS}")
        self.method = method
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, memoryview] = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _map(self, path: Path) -> memoryview:
        m = self._maps.get(path)
        if m is None:
            m = self._maps[path] = memoryview(mmap.mmap(self._fd(path), 0, access=mmap.ACCESS_READ))
        return m

    def read_raw(self, span: Span, dst: memoryview) -> None:
        """Exactly span.nbytes into dst (a byte memoryview of that length)."""
        if self.method == "mmap":
            dst[:] = self._map(span.path)[span.offset : span.offset + span.nbytes]
            return
        fd, done = self._fd(span.path), 0
        while done < span.nbytes:
            n = os.preadv(fd, [dst[done:]], span.offset + done)
            if n <= 0:
                raise CheckpointError(f"{span.path}: short read at byte {span.offset + done}; the file changed or is truncated")
            done += n

    def read(self, span: Span, dst: memoryview, dst_dtype: str) -> None:
        """span into dst, converting a float span to the slot's float dtype (e.g. bfloat16 -> float32 on CPU)."""
        if dst_dtype == span.dtype:
            return self.read_raw(span, dst)
        staging = bytearray(span.nbytes)
        self.read_raw(span, memoryview(staging))
        src = bfloat16_to_float32(memoryview(staging)) if span.dtype == "BF16" else np.frombuffer(staging, _NP_DTYPES[span.dtype])
        out = np.frombuffer(dst, dtype=np.uint16) if dst_dtype in ("BF16",) else np.frombuffer(dst, _NP_DTYPES[dst_dtype])
        if dst_dtype == "BF16":  # round to nearest even, as astype(bfloat16) does
            f = src.astype(np.float32).view(np.uint32)
            out[:] = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            out[:] = src

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the os module may be gone already
            pass

    def close(self) -> None:
        for m in self._maps.values():
            m.release()
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

