"""A fixed per-layer slot bank of resident experts, filled from the checkpoint on demand.

The bank is an mlx-lm SwitchGLU whose expert axis has S slots instead of E experts. Each forward pass
syncs once (the routed indices), makes sure every chosen expert sits in a slot (a miss reads just that
expert's bytes into a free slot or one the policy evicts), remaps expert ids to slot ids and runs the
same batched gather_(q)mm on the bank, so the arithmetic is the all-resident model's, expert for expert.

Slots are written in place: a bank array's buffer is exposed through the buffer protocol (on Apple silicon
and the CPU it is the very memory the kernels read; unified memory) and `pread` lands the bytes there.
Where that does not hold (checked once per bank: a device whose buffers are not host memory), the bank
falls back to `bank[slot] = bytes` updates, evaluated together per layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from ..models.moe import swiglu
from .policies import Policy
from .source import ExpertReader, Span

MX_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "U8": mx.uint8, "I8": mx.int8}
ST_DTYPES = {v: k for k, v in MX_DTYPES.items()}
_FLOAT = ("F32", "F16", "BF16")


@dataclass
class LayerStats:
    """One bank's counters for one phase (decode: one token per pass; prefill: several)."""

    passes: int = 0
    tokens: int = 0
    hits: int = 0  # distinct experts a pass needed that were resident
    misses: int = 0  # ... that had to be read
    prefetched: int = 0  # experts read ahead of their layer by the prefetcher
    prefetch_hits: int = 0  # hits on a prefetched expert before any other use
    bytes_read: int = 0
    stall_s: float = 0.0  # time the forward pass waited on reads (its own and unfinished prefetches)

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> dict:
        n = self.hits + self.misses
        return {
            "hit_rate": self.hits / n if n else None, "hits": self.hits, "misses": self.misses,
            "bytes_read": self.bytes_read, "bytes_read_per_token": self.bytes_read / max(self.tokens, 1),
            "stall_s": round(self.stall_s, 6), "prefetched": self.prefetched, "prefetch_hits": self.prefetch_hits,
            "tokens": self.tokens,
        }


def bank_dtype(span: Span, dtype: Optional[mx.Dtype]) -> str:
    """The slot dtype of a tensor: as stored, floats cast to `dtype` if given; on the CPU float16/bfloat16
    become float32 (MLX's CPU gather_mm needs it; the loader does the same for resident experts)."""
    if span.dtype not in _FLOAT:
        return span.dtype
    name = ST_DTYPES[dtype] if dtype is not None else span.dtype
    if mx.default_device() == mx.cpu and name in ("F16", "BF16"):
        name = "F32"
    return name


class SlotBank:
    """The resident experts of one MoE layer: S slots, which expert each holds, and its policy."""

    def __init__(self, layer: int, template: nn.Module, spans: dict[str, list[Span]], n_slots: int,
                 policy: Policy, reader: ExpertReader, dtype: Optional[mx.Dtype] = None,
                 write_through: Optional[bool] = None):
        self.layer, self.spans, self.policy, self.reader = layer, spans, policy, reader
        self.n_experts = len(next(iter(spans.values())))
        self.n_slots = n_slots
        self.glu = self._build(template, n_slots)
        self.dtypes = {p: bank_dtype(s[0], dtype) for p, s in spans.items()}
        arrays = {p: mx.zeros((n_slots, *s[0].shape), MX_DTYPES[self.dtypes[p]]) for p, s in spans.items()}
        mx.eval(list(arrays.values()))
        for param, a in arrays.items():
            proj, leaf = param.split(".")
            setattr(getattr(self.glu, proj), leaf, a)
        self.row_bytes = {p: a.nbytes // n_slots for p, a in arrays.items()}
        self.expert_bytes = sum(self.row_bytes.values())
        self.resident = np.full(n_slots, -1, dtype=np.int64)  # expert held by each slot
        self.where = np.full(self.n_experts, -1, dtype=np.int64)  # slot of each expert
        self.pinned = np.zeros(n_slots, dtype=bool)
        self.fresh = np.zeros(n_slots, dtype=bool)  # prefetched and not yet used
        self.write_through = self._writes_through() if write_through is None else write_through
        self.stats = {"decode": LayerStats(), "prefill": LayerStats()}
        self.naive = False  # no cache: every pass reads all its experts (the benchmark's baseline)

    @staticmethod
    def _build(template: nn.Module, n_slots: int) -> SwitchGLU:
        """A SwitchGLU of n_slots experts, each projection quantized as the template's (RoutedExperts) is. The
        bank keeps the checkpoints' layout (gate_proj, up_proj apart): slots are filled byte for byte from the files."""
        joined = template.gate_up_proj
        hidden, inter = joined.input_dims, joined.output_dims // 2
        glu = SwitchGLU(hidden, inter, n_slots, activation=swiglu)
        for proj, t in (("gate_proj", joined), ("up_proj", joined), ("down_proj", template.down_proj)):
            if isinstance(t, QuantizedSwitchLinear):
                f = getattr(glu, proj)
                setattr(glu, proj, QuantizedSwitchLinear(f.input_dims, f.output_dims, n_slots, False, t.group_size,
                                                         t.bits, t.mode))
        return glu

    def _buffer(self, param: str) -> memoryview:
        proj, leaf = param.split(".")
        return memoryview(getattr(getattr(self.glu, proj), leaf)).cast("B")

    def _writes_through(self) -> bool:
        """Whether bytes written through the buffer protocol are what the kernels read (checked once)."""
        param = next(iter(self.spans))
        proj, leaf = param.split(".")
        a = getattr(getattr(self.glu, proj), leaf)
        view = self._buffer(param)
        if view.nbytes != a.nbytes:
            return False
        view[:4] = b"\x01\x02\x03\x04"
        seen = mx.view(mx.flatten(a), mx.uint8)[:4] * 1
        ok = seen.tolist() == [1, 2, 3, 4]
        view[:4] = b"\x00\x00\x00\x00"
        return ok

    # ---- filling slots -----------------------------------------------------------------------------
    def _load(self, expert: int, slot: int, phase: str) -> float:
        """Read one expert into one slot; returns the seconds it took."""
        tic = time.perf_counter()
        if self.write_through:
            for param, spans in self.spans.items():
                n = self.row_bytes[param]
                self.reader.read(spans[expert], self._buffer(param)[slot * n : (slot + 1) * n], self.dtypes[param])
        else:
            for param, spans in self.spans.items():
                proj, leaf = param.split(".")
                module = getattr(self.glu, proj)
                staging = bytearray(self.row_bytes[param])
                self.reader.read(spans[expert], memoryview(staging), self.dtypes[param])
                a = getattr(module, leaf)
                row = mx.array(np.frombuffer(staging, np.uint8)).view(a.dtype).reshape(a.shape[1:])
                a[slot] = row
                mx.eval(a)
        old = self.resident[slot]
        if old >= 0:
            self.where[old] = -1
        self.resident[slot], self.where[expert] = expert, slot
        self.stats[phase].bytes_read += self.expert_bytes
        return time.perf_counter() - tic

    def ensure(self, experts: np.ndarray, phase: str) -> float:
        """Every expert of `experts` (distinct, at most the evictable slots) resident; seconds spent reading."""
        st = self.stats[phase]
        needed = np.zeros(self.n_experts, dtype=bool)
        needed[experts] = True
        spent = 0.0
        for e in experts:
            s = self.where[e]
            if s >= 0:
                st.hits += 1
                st.prefetch_hits += int(self.fresh[s])
                self.fresh[s] = False
                continue
            st.misses += 1
            evictable = ~self.pinned & ((self.resident < 0) | ~needed[np.maximum(self.resident, 0)])
            slot = self.policy.victim(self.resident, evictable)
            spent += self._load(int(e), slot, phase)
            self.fresh[slot] = False
        return spent

    def prefetch(self, experts: np.ndarray) -> None:
        """Read predicted experts ahead of this layer's pass (runs on the prefetch thread)."""
        st = self.stats["decode"]
        wanted = np.zeros(self.n_experts, dtype=bool)
        wanted[experts] = True
        for e in experts:
            if self.where[e] >= 0:
                continue
            evictable = ~self.pinned & ((self.resident < 0) | ~wanted[np.maximum(self.resident, 0)])
            if not evictable.any():
                return
            slot = self.policy.victim(self.resident, evictable)
            self._load(int(e), slot, "decode")
            self.fresh[slot] = True
            st.prefetched += 1

    def pin(self, experts: np.ndarray) -> None:
        """Load these experts now and never evict them."""
        for e in experts:
            slot = self.policy.victim(self.resident, ~self.pinned)
            self._load(int(e), slot, "prefill")
            self.pinned[slot] = True
        self.stats["prefill"] = LayerStats()

    def forget(self) -> None:
        """Empty every unpinned slot (the naive baseline does this before each pass)."""
        self.where[self.resident[~self.pinned & (self.resident >= 0)]] = -1
        self.resident[~self.pinned] = -1

    # ---- the forward pass ----------------------------------------------------------------------------
    def run(self, x: mx.array, inds: np.ndarray, phase: str) -> mx.array:
        """SwitchGLU(x, inds) on the bank: y [..., k, D] exactly as the all-resident experts give it."""
        if self.naive:
            self.forget()
        experts, counts = np.unique(inds, return_counts=True)
        st = self.stats[phase]
        st.passes += 1
        st.tokens += int(math.prod(inds.shape[:-1]))
        pinned = self.pinned[self.where[experts]] & (self.where[experts] >= 0)
        room = self.n_slots - int(self.pinned.sum())  # unpinned slots
        if len(experts) - int(pinned.sum()) <= room:
            st.stall_s += self.ensure(experts, phase)
            self.policy.access(experts, counts)
            return self.glu(x, mx.array(self.where[inds].astype(np.int32)))
        # more distinct experts than slots (a long prefill): pinned and resident ones first, the rest in groups
        # of `room`; each group's outputs are selected exactly (mx.where) and evaluated before its slots are reused
        others = experts[~pinned]
        others = others[np.argsort(self.where[others] < 0, kind="stable")]
        y = None
        for i in range(0, len(others), room):
            group = others[i : i + room] if i else np.concatenate([experts[pinned], others[:room]])
            st.stall_s += self.ensure(group, phase)
            chosen = np.isin(inds, group)
            part = self.glu(x, mx.array(np.where(chosen, np.maximum(self.where[inds], 0), 0).astype(np.int32)))
            y = part if y is None else mx.where(mx.array(chosen)[..., None], part, y)
            mx.eval(y)
        self.policy.access(experts, counts)
        return y


class OffloadedSwitchGLU(nn.Module):
    """Stands in for a DeepSeekMoE's `switch_mlp`: same call, experts from a SlotBank. It has no parameters
    (the bank is not part of the model's tree: the experts live in the checkpoint files)."""

    def __init__(self, bank: SlotBank, offloader):
        super().__init__()
        self.bank = bank
        self.offloader = offloader

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self.offloader.run(self.bank, x, indices)
